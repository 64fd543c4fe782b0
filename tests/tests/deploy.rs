//! `deploy/` is what an operator copies onto a kubeadm control-plane node.
//! This checks that its parts agree with each other and with the binaries:
//!
//! - every static pod manifest parses and has what a control-plane static
//!   pod needs (host network, `system-node-critical`, no capability beyond
//!   NET_ADMIN/NET_RAW for the arp-mode VIP, SYS_NICE only for LB
//!   real-time control threads a shipped config asks for, read-only key material, probes
//!   on the admin port its config sets);
//! - every file a shipped config names is visible inside the container
//!   (mounted, or installed by the Containerfile), writable where the daemon
//!   writes;
//! - the daemons accept the manifests' arguments together with the shipped
//!   configs under `--check-config`.
//!
//! `--check-config` reads the files a config names (TLS material must
//! parse, age keys must load), because that is what an operator wants on a
//! node: a missing key found before the kubelet starts a crash loop. So the
//! test builds the node's files under a temporary root (certificates from a
//! test CA with the identities deploy/GUIDE.md prescribes, age keys, the
//! drill tools) and runs the daemons on copies of the configs whose absolute
//! paths point into that root.
//!
//! The daemons must be built: the whole-workspace test run builds them;
//! alone, `cargo build -p bulwark-lb -p bulwark-prober -p bulwark-backup -p
//! bulwark-ctl --bins` first.

// Test code: a failed expectation panics with the file and field in the message.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_testkit::{Pki, TestDir, tools};
use serde_yaml_ng::Value;

const DAEMONS: [&str; 3] = ["bulwark-lb", "bulwark-prober", "bulwark-backup"];
const NODES: [&str; 3] = ["cp-1", "cp-2", "cp-3"];

fn deploy_dir() -> PathBuf {
    tools::workspace_root().join("deploy")
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `v` at a dotted path (`spec.containers`), `Null` when absent.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .unwrap_or(&Value::Null)
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or("")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The config file a daemon reads on `node`, by the manifest's `--config`.
fn config_file(daemon: &str) -> &'static str {
    match daemon {
        "bulwark-lb" => "lb.yaml",
        "bulwark-prober" => "prober.yaml",
        "bulwark-backup" => "backup.yaml",
        other => panic!("unknown daemon {other}"),
    }
}

fn kind_of(daemon: &str) -> &'static str {
    match daemon {
        "bulwark-lb" => "LoadBalancerConfiguration",
        "bulwark-prober" => "ProberConfiguration",
        "bulwark-backup" => "BackupConfiguration",
        other => panic!("unknown daemon {other}"),
    }
}

/// A hostPath volume: the host path and its `type`.
#[derive(Debug)]
struct HostPath {
    path: PathBuf,
    ty: String,
}

/// One container's mounts: mount path -> (read-only, the hostPath or None
/// for an emptyDir).
#[derive(Debug)]
struct Mounts(BTreeMap<PathBuf, (bool, Option<HostPath>)>);

impl Mounts {
    fn of(pod: &Value, container: &Value, what: &str) -> Self {
        let volumes: BTreeMap<String, &Value> = at(pod, "spec.volumes")
            .as_sequence()
            .unwrap_or_else(|| panic!("{what}: spec.volumes missing"))
            .iter()
            .map(|v| (str_at(v, "name").to_owned(), v))
            .collect();
        let mut out = BTreeMap::new();
        for m in at(container, "volumeMounts").as_sequence().unwrap() {
            let name = str_at(m, "name");
            let vol = volumes
                .get(name)
                .unwrap_or_else(|| panic!("{what}: volumeMount {name:?} names no volume"));
            let host = match at(vol, "hostPath") {
                Value::Null => {
                    assert!(
                        !at(vol, "emptyDir").is_null(),
                        "{what}: volume {name:?} is neither hostPath nor emptyDir (static pods cannot use others)"
                    );
                    None
                }
                hp => {
                    let ty = str_at(hp, "type");
                    assert!(
                        ["File", "Directory", "DirectoryOrCreate"].contains(&ty),
                        "{what}: volume {name:?} needs an explicit hostPath type, got {ty:?}"
                    );
                    Some(HostPath {
                        path: PathBuf::from(str_at(hp, "path")),
                        ty: ty.to_owned(),
                    })
                }
            };
            let mount_path = PathBuf::from(str_at(m, "mountPath"));
            // Same path inside and out: the configs name host paths, so an
            // operator can run `--check-config` on the node itself.
            if let Some(h) = &host {
                assert_eq!(
                    h.path, mount_path,
                    "{what}: volume {name:?} is mounted at another path than on the host"
                );
            }
            let ro = at(m, "readOnly").as_bool().unwrap_or(false);
            out.insert(mount_path, (ro, host));
        }
        Mounts(out)
    }

    /// The mount that makes `path` visible, if any: the longest mount path
    /// that is `path` or a parent of it.
    fn covering(&self, path: &Path) -> Option<(&Path, bool)> {
        self.0
            .iter()
            .filter(|(m, _)| path.starts_with(m))
            .max_by_key(|(m, _)| m.as_os_str().len())
            .map(|(m, (ro, _))| (m.as_path(), *ro))
    }
}

/// The final stage of the Containerfile: every file it installs.
fn image_files() -> BTreeSet<PathBuf> {
    let text = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    // Join continuation lines, then look at the last stage only.
    let joined = text.replace("\\\n", " ");
    let last = joined
        .rsplit_once("\nFROM ")
        .map(|(_, s)| s)
        .expect("Containerfile has no FROM");
    let mut files = BTreeSet::new();
    for line in last.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"COPY") {
            continue;
        }
        let args: Vec<&str> = words[1..]
            .iter()
            .copied()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (dest, sources) = args.split_last().expect("COPY without arguments");
        assert!(dest.ends_with('/'), "COPY to a directory: {line}");
        for s in sources {
            let name = Path::new(s).file_name().unwrap();
            files.insert(Path::new(dest).join(name));
        }
    }
    files
}

/// The image installs our four binaries, built by the Containerfile's own
/// `cargo build` from the packages that own them, plus etcd's tools for
/// drills and restores.
#[test]
fn the_image_builds_what_it_installs() {
    let text = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let build = joined
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("Containerfile runs no cargo build");
    let words: Vec<&str> = build.split_whitespace().collect();
    let packages: BTreeSet<&str> = words
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    let image = image_files();
    for bin in [
        "bulwark-lb",
        "bulwark-prober",
        "bulwark-backup",
        "bulwarkctl",
    ] {
        assert!(
            image.contains(&Path::new("/usr/local/bin").join(bin)),
            "the image lacks {bin}"
        );
        // A binary this workspace really builds under that name.
        tools::bin_path(bin).unwrap();
        let package = if bin == "bulwarkctl" {
            "bulwark-ctl"
        } else {
            bin
        };
        assert!(
            packages.contains(package),
            "the Containerfile's cargo build lacks -p {package}: {build}"
        );
    }
    for tool in ["etcd", "etcdutl"] {
        assert!(
            image.contains(&Path::new("/usr/local/bin").join(tool)),
            "the image lacks {tool}"
        );
    }
}

/// Every absolute path (`/…` or `file:///…`) among the string values of a
/// config, with the field it came from.
fn config_paths(v: &Value, field: &str, out: &mut Vec<(String, PathBuf)>) {
    match v {
        Value::String(s) if s.starts_with('/') => out.push((field.to_owned(), PathBuf::from(s))),
        Value::String(s) if s.starts_with("file:///") => {
            out.push((field.to_owned(), PathBuf::from(&s["file://".len()..])))
        }
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap_or("?");
                config_paths(v, &format!("{field}.{k}"), out);
            }
        }
        Value::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                config_paths(v, &format!("{field}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// A config with every absolute path moved under `root`.
fn rebase(v: &Value, root: &Path) -> Value {
    match v {
        Value::String(s) if s.starts_with('/') => Value::String(format!("{}{s}", root.display())),
        Value::String(s) if s.starts_with("file:///") => Value::String(format!(
            "file://{}{}",
            root.display(),
            &s["file://".len()..]
        )),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), rebase(v, root)))
                .collect(),
        ),
        Value::Sequence(s) => Value::Sequence(s.iter().map(|v| rebase(v, root)).collect()),
        other => other.clone(),
    }
}

fn socket(v: &Value, path: &str, what: &str) -> SocketAddr {
    str_at(v, path)
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {path} is not ip:port: {e}"))
}

struct Daemon {
    name: &'static str,
    pod: Value,
    container: Value,
    mounts: Mounts,
    args: Vec<String>,
}

fn manifests() -> Vec<Daemon> {
    let files: BTreeSet<String> = std::fs::read_dir(deploy_dir().join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = DAEMONS.iter().map(|d| format!("{d}.yaml")).collect();
    assert_eq!(
        files, expected,
        "deploy/manifests/ holds one manifest per daemon"
    );
    DAEMONS
        .iter()
        .map(|&name| {
            let what = format!("manifests/{name}.yaml");
            let pod = read_yaml(&deploy_dir().join(&what));
            let containers = at(&pod, "spec.containers").as_sequence().unwrap();
            assert_eq!(containers.len(), 1, "{what}: one container");
            let container = containers[0].clone();
            let mounts = Mounts::of(&pod, &container, &what);
            let args = strings(at(&container, "args"));
            Daemon {
                name,
                pod,
                container,
                mounts,
                args,
            }
        })
        .collect()
}

fn node_config(node: &str, daemon: &str) -> Value {
    read_yaml(
        &deploy_dir()
            .join("config")
            .join(node)
            .join(config_file(daemon)),
    )
}

/// The document of `kind` in deploy/config/kubeadm-config.yaml.
fn kubeadm_config(kind: &str) -> Value {
    let text = std::fs::read_to_string(deploy_dir().join("config/kubeadm-config.yaml")).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|d| str_at(d, "kind") == kind)
        .unwrap_or_else(|| panic!("kubeadm-config.yaml has no {kind}"))
}

/// kube-apiserver's --goaway-chance (GUIDE, step 1) is set, in kubeadm
/// v1beta4's list form, to a value kube-apiserver accepts.
#[test]
fn kubeadm_config_sets_a_goaway_chance_kube_apiserver_accepts() {
    let cluster = kubeadm_config("ClusterConfiguration");
    let args = at(&cluster, "apiServer.extraArgs")
        .as_sequence()
        .expect("apiServer.extraArgs is a list of {name, value}");
    let chance = args
        .iter()
        .find(|a| str_at(a, "name") == "goaway-chance")
        .map(|a| str_at(a, "value"))
        .expect("apiServer.extraArgs sets goaway-chance");
    let chance: f64 = chance.parse().unwrap();
    bulwark_testkit::fixture::validate_goaway_chance(chance).unwrap();
    assert!(chance > 0.0, "a goaway chance of 0 is off");
}

/// The apiserver certificate covers every address the front serves it
/// under: the VIP (controlPlaneEndpoint) and each node's node-local
/// listener (KubePrism-style, the kubelet's server in the GUIDE). TLS
/// passes through, so a host missing here fails every client verifying it.
#[test]
fn kubeadm_cert_sans_cover_the_vip_and_the_node_local_listener() {
    let sans = tools::kubeadm_cert_sans().unwrap();
    let cluster = kubeadm_config("ClusterConfiguration");
    let endpoint = str_at(&cluster, "controlPlaneEndpoint");
    let (vip, _) = endpoint.rsplit_once(':').unwrap();
    assert!(
        sans.iter().any(|s| s == vip),
        "certSANs {sans:?} lack the VIP {vip}"
    );
    for node in NODES {
        let lb = node_config(node, "bulwark-lb");
        let local: SocketAddr = str_at(&lb, "localListener").parse().unwrap();
        assert!(
            sans.contains(&local.ip().to_string()),
            "certSANs {sans:?} lack {}, where {node}'s node-local listener serves the apiservers",
            local.ip()
        );
    }
}

#[test]
fn manifests_are_control_plane_static_pods() {
    let image = image_files();
    let lb_uses_arp = NODES
        .iter()
        .any(|n| str_at(&node_config(n, "bulwark-lb"), "vip.mode") == "arp");
    // `realtimePriority` (default 0) above 0 asks for SCHED_RR: SYS_NICE.
    let lb_realtime = NODES.iter().any(|n| {
        let priority = at(&node_config(n, "bulwark-lb"), "realtimePriority").as_u64();
        priority.unwrap_or(0) != 0
    });
    for d in manifests() {
        let what = format!("manifests/{}.yaml", d.name);
        let pod = &d.pod;
        assert_eq!(str_at(pod, "apiVersion"), "v1", "{what}");
        assert_eq!(str_at(pod, "kind"), "Pod", "{what}");
        assert_eq!(str_at(pod, "metadata.name"), d.name, "{what}");
        assert_eq!(str_at(pod, "metadata.namespace"), "kube-system", "{what}");
        assert_eq!(
            at(pod, "spec.hostNetwork").as_bool(),
            Some(true),
            "{what}: hostNetwork"
        );
        assert_eq!(
            str_at(pod, "spec.priorityClassName"),
            "system-node-critical",
            "{what}"
        );

        let c = &d.container;
        let command = strings(at(c, "command"));
        let binary = PathBuf::from("/usr/local/bin").join(d.name);
        assert_eq!(command, [binary.display().to_string()], "{what}: command");
        assert!(
            image.contains(&binary),
            "{what}: the Containerfile does not install {}",
            binary.display()
        );

        let sc = at(c, "securityContext");
        assert_ne!(
            at(sc, "privileged").as_bool(),
            Some(true),
            "{what}: privileged"
        );
        assert_eq!(
            at(sc, "allowPrivilegeEscalation").as_bool(),
            Some(false),
            "{what}"
        );
        assert_eq!(
            at(sc, "readOnlyRootFilesystem").as_bool(),
            Some(true),
            "{what}"
        );
        assert_eq!(
            strings(at(sc, "capabilities.drop")),
            ["ALL"],
            "{what}: drop every capability"
        );
        let mut added = strings(at(sc, "capabilities.add"));
        added.sort();
        let mut expected: Vec<&str> = Vec::new();
        if d.name == "bulwark-lb" && lb_uses_arp {
            expected.extend(["NET_ADMIN", "NET_RAW"]);
        }
        if d.name == "bulwark-lb" && lb_realtime {
            expected.push("SYS_NICE");
        }
        assert_eq!(added, expected, "{what}: capabilities added");

        // Key material and configs are never writable from the container.
        for (path, (ro, host)) in &d.mounts.0 {
            if path.starts_with("/etc/kubernetes/pki") || path.starts_with("/etc/bulwark") {
                assert!(*ro, "{what}: {} must be mounted readOnly", path.display());
                assert!(host.is_some(), "{what}: {}", path.display());
            }
        }
        assert!(
            d.mounts
                .covering(Path::new("/etc/kubernetes/pki/ca.crt"))
                .is_some(),
            "{what}: the cluster CA is not mounted"
        );

        // Probes: plain HTTP on the admin address every node's config sets.
        for node in NODES {
            let cfg = node_config(node, d.name);
            let admin = socket(&cfg, "admin.address", &format!("config/{node}"));
            for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
                let get = at(c, &format!("{probe}.httpGet"));
                assert_eq!(str_at(get, "path"), path, "{what}: {probe}");
                assert_eq!(
                    at(get, "port").as_u64(),
                    Some(u64::from(admin.port())),
                    "{what}: {probe} port vs admin.address of config/{node}/{}",
                    config_file(d.name)
                );
                assert_eq!(str_at(get, "scheme"), "HTTP", "{what}: {probe}");
                if !admin.ip().is_unspecified() {
                    assert_eq!(
                        str_at(get, "host").parse::<IpAddr>().ok(),
                        Some(admin.ip()),
                        "{what}: {probe} must dial the address the admin server binds ({admin})"
                    );
                }
            }
        }
    }
}

#[test]
fn every_file_a_config_names_is_visible_in_its_container() {
    let image = image_files();
    let kubeadm = kubeadm_config("ClusterConfiguration");
    for d in manifests() {
        let what = format!("manifests/{}.yaml", d.name);
        let config_arg = d
            .args
            .iter()
            .find_map(|a| a.strip_prefix("--config="))
            .unwrap_or_else(|| panic!("{what}: no --config=FILE argument"));
        for node in NODES {
            let file = format!("config/{node}/{}", config_file(d.name));
            let cfg = node_config(node, d.name);
            assert_eq!(str_at(&cfg, "kind"), kind_of(d.name), "{file}");
            assert_eq!(
                d.mounts.covering(Path::new(config_arg)).map(|(_, ro)| ro),
                Some(true),
                "{what}: {config_arg} not mounted read-only"
            );
            let mut paths = Vec::new();
            config_paths(&cfg, "", &mut paths);
            assert!(!paths.is_empty(), "{file} names no file at all?");
            for (field, path) in &paths {
                assert!(
                    image.contains(path) || d.mounts.covering(path).is_some(),
                    "{file}{field}: {} is neither mounted by {what} nor in the image",
                    path.display()
                );
            }
            // Where the daemon writes, the mount must be writable.
            let mut writes: Vec<PathBuf> = Vec::new();
            match d.name {
                "bulwark-lb" => writes.push(PathBuf::from(str_at(&cfg, "dataDir"))),
                "bulwark-backup" => {
                    if let Some(p) = at(&cfg, "drill.workDir").as_str() {
                        writes.push(PathBuf::from(p));
                    }
                    if let Some(p) = str_at(&cfg, "store.url").strip_prefix("file://") {
                        writes.push(PathBuf::from(p));
                    }
                    // Restore: etcd's manifest leaves and returns to the
                    // manifests dir.
                    writes.push(PathBuf::from("/etc/kubernetes/manifests/etcd.yaml"));
                    // Restore: etcd's data dir is renamed aside and rebuilt
                    // beside it, so it and its siblings share one writable
                    // mount (a rename cannot cross mounts or move a mount
                    // point).
                    let data_dir = PathBuf::from(str_at(&kubeadm, "etcd.local.dataDir"));
                    let sibling = data_dir.with_file_name("etcd.bulwark-restore");
                    let (m, ro) = d.mounts.covering(&data_dir).unwrap_or_else(|| {
                        panic!(
                            "{what}: etcd's data dir {} is not mounted",
                            data_dir.display()
                        )
                    });
                    assert!(
                        !ro && m != data_dir && d.mounts.covering(&sibling) == Some((m, ro)),
                        "{what}: mount the parent of {} read-write",
                        data_dir.display()
                    );
                }
                _ => {}
            }
            for w in writes {
                assert_eq!(
                    d.mounts.covering(&w).map(|(_, ro)| ro),
                    Some(false),
                    "{what}: {} must be inside a writable mount",
                    w.display()
                );
            }
        }
    }
}

/// Ports on one node: no two listeners of ours collide with each other or
/// with kubeadm's own (apiserver, etcd, kubelet, controller-manager,
/// scheduler), and the VIP is the kubeadm controlPlaneEndpoint.
#[test]
fn listeners_on_a_node_do_not_collide() {
    let endpoint = str_at(
        &kubeadm_config("ClusterConfiguration"),
        "controlPlaneEndpoint",
    )
    .to_owned();
    let any = |port: u16| SocketAddr::from(([0, 0, 0, 0], port));
    let lo = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    for node in NODES {
        let lb = node_config(node, "bulwark-lb");
        let prober = node_config(node, "bulwark-prober");
        let backup = node_config(node, "bulwark-backup");
        let vip = format!(
            "{}:{}",
            str_at(&lb, "vip.address"),
            at(&lb, "vip.port").as_u64().unwrap()
        );
        assert_eq!(
            vip, endpoint,
            "config/{node}/lb.yaml: the VIP is kubeadm's controlPlaneEndpoint"
        );
        let mut listeners: Vec<(String, SocketAddr)> = vec![
            ("kube-apiserver".into(), any(6443)),
            ("etcd client".into(), any(2379)),
            ("etcd peer".into(), any(2380)),
            ("etcd metrics".into(), lo(2381)),
            ("kubelet".into(), any(10250)),
            ("kubelet healthz".into(), lo(10248)),
            ("kube-controller-manager".into(), lo(10257)),
            ("kube-scheduler".into(), lo(10259)),
            ("lb raft".into(), socket(&lb, "raft.address", node)),
            ("lb api".into(), socket(&lb, "api.address", node)),
            ("lb admin".into(), socket(&lb, "admin.address", node)),
            ("lb vip".into(), vip.parse().unwrap()),
            (
                "prober admin".into(),
                socket(&prober, "admin.address", node),
            ),
            ("backup grpc".into(), socket(&backup, "grpc.address", node)),
            (
                "backup admin".into(),
                socket(&backup, "admin.address", node),
            ),
        ];
        if let Some(l) = at(&lb, "localListener").as_str() {
            listeners.push(("lb local listener".into(), l.parse().unwrap()));
        }
        for (i, (a, x)) in listeners.iter().enumerate() {
            for (b, y) in &listeners[i + 1..] {
                let overlap =
                    x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified();
                assert!(
                    !(overlap && x.port() == y.port()),
                    "{node}: {a} ({x}) and {b} ({y}) cannot both listen"
                );
            }
        }
    }
}

/// The files a node has before the daemons start, built under `root` the
/// way deploy/GUIDE.md prescribes: kubeadm's PKI (one test CA stands in
/// for both kubeadm CAs), bulwark's certificates with their identities, the
/// age key pair, the drill tools the image ships.
fn materialize(root: &Path, pki: &Pki, daemon: &Daemon, node: &str) {
    let place = |path: &Path, contents: &str| {
        let target = root.join(path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, contents).unwrap();
    };
    let identity = age::x25519::Identity::generate();
    let mut certs: BTreeMap<String, bulwark_testkit::CertFiles> = BTreeMap::new();
    for (path, (_, host)) in &daemon.mounts.0 {
        let Some(HostPath { path: host, ty }) = host else {
            std::fs::create_dir_all(root.join(path.strip_prefix("/").unwrap())).unwrap();
            continue;
        };
        if ty != "File" {
            std::fs::create_dir_all(root.join(host.strip_prefix("/").unwrap())).unwrap();
            continue;
        }
        let name = host.file_name().unwrap().to_string_lossy().into_owned();
        if host.starts_with("/etc/bulwark") {
            match name.as_str() {
                "backup-age.pub" => place(host, &format!("{}\n", identity.to_public())),
                "backup-age.key" => {
                    use age::secrecy::ExposeSecret as _;
                    place(host, &format!("{}\n", identity.to_string().expose_secret()));
                }
                n if n.ends_with(".yaml") => {
                    let cfg = node_config(node, daemon.name);
                    place(
                        host,
                        &serde_yaml_ng::to_string(&rebase(&cfg, root)).unwrap(),
                    );
                }
                other => panic!("no rule to make /etc/bulwark/{other}"),
            }
        } else if name == "ca.crt" {
            place(host, pki.ca_pem());
        } else if let Some((stem, ext @ ("crt" | "key"))) = name.rsplit_once('.') {
            // The identities of deploy/GUIDE.md, "Certificates"; one
            // certificate per stem, so a .crt and its .key match.
            let cert = certs.entry(stem.to_owned()).or_insert_with(|| {
                let org = match stem {
                    "bulwark-lb" => "bulwark:lb",
                    "prober" => "bulwark:probers",
                    "backup" => "bulwark:backup",
                    _ => "kubeadm",
                };
                // SANs as the GUIDE's `issue` gives them: the node's
                // address, which `--check-config` checks against the
                // addresses peers dial.
                let node_ip = str_at(&node_config(node, "bulwark-lb"), "raft.address")
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_owned())
                    .unwrap();
                pki.peer(
                    &format!("{node}-{}-{stem}", daemon.name),
                    &[org],
                    &["127.0.0.1", &node_ip],
                )
                .unwrap()
            });
            place(
                host,
                if ext == "crt" {
                    cert.cert_pem()
                } else {
                    cert.key_pem()
                },
            );
        } else {
            panic!("no rule to make {}", host.display());
        }
    }
    // What the image ships at the paths the configs name.
    for (tool, real) in [
        ("/usr/local/bin/etcdutl", tools::etcdutl().unwrap()),
        (
            "/usr/local/bin/etcd",
            tools::etcd(bulwark_testkit::EtcdVersion::V3_5).unwrap(),
        ),
    ] {
        let target = root.join(tool.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if !target.exists() {
            std::os::unix::fs::symlink(real, &target).unwrap();
        }
    }
}

/// The install gate: before the daemon, an init container runs the same
/// binary with the same config, arguments, mounts and user, plus
/// `--check-config`, so a broken config stops the pod with the reasons in
/// that container's log instead of crashlooping a half-started daemon.
#[test]
fn every_manifest_runs_check_config_before_the_daemon() {
    for d in manifests() {
        let what = format!("manifests/{}.yaml", d.name);
        let inits = at(&d.pod, "spec.initContainers")
            .as_sequence()
            .unwrap_or_else(|| panic!("{what}: no initContainers (the --check-config gate)"));
        assert_eq!(inits.len(), 1, "{what}: one init container, the gate");
        let gate = &inits[0];
        assert_eq!(str_at(gate, "name"), "check-config", "{what}");
        for field in ["image", "imagePullPolicy", "command", "volumeMounts"] {
            assert_eq!(
                at(gate, field),
                at(&d.container, field),
                "{what}: the gate's {field} differs from the daemon's"
            );
        }
        assert_eq!(
            at(gate, "securityContext.runAsUser"),
            at(&d.container, "securityContext.runAsUser"),
            "{what}: the gate must read the keys as the daemon's user"
        );
        assert_eq!(
            strings(at(gate, "securityContext.capabilities.drop")),
            ["ALL"],
            "{what}: the gate needs no capability"
        );
        assert!(
            strings(at(gate, "securityContext.capabilities.add")).is_empty(),
            "{what}: the gate needs no capability"
        );
        let mut expected = d.args.clone();
        expected.push("--check-config".into());
        assert_eq!(
            strings(at(gate, "args")),
            expected,
            "{what}: the gate checks the daemon's own arguments and config"
        );
        assert!(
            d.args
                .iter()
                .any(|a| a.starts_with("--config=/etc/bulwark/")),
            "{what}: the daemon reads its config from /etc/bulwark"
        );
    }
}

#[test]
fn daemons_accept_the_manifest_args_and_the_shipped_configs() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    for d in manifests() {
        let binary = tools::bin_path(d.name).unwrap();
        // Every flag the manifest passes is one the binary documents.
        let help = Command::new(&binary).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for a in &d.args {
            let flag = a.split_once('=').map_or(a.as_str(), |(f, _)| f);
            assert!(
                help.split(|c: char| c.is_whitespace() || ",[]".contains(c))
                    .any(|w| w == flag),
                "manifests/{}.yaml passes {flag}, which `{} --help` does not list",
                d.name,
                d.name
            );
        }
        for node in NODES {
            let root = TestDir::new(&format!("deploy-{node}-{}", d.name)).unwrap();
            materialize(root.path(), &pki, &d, node);
            let args: Vec<String> = d
                .args
                .iter()
                .map(|a| match a.split_once("=/") {
                    Some((flag, path)) => format!("{flag}={}/{path}", root.path().display()),
                    None => a.clone(),
                })
                .collect();
            let out = Command::new(&binary)
                .args(&args)
                .arg("--check-config")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains(&format!("valid {}", kind_of(d.name))),
                "{} {args:?} --check-config with config/{node}/{}: {}\nstdout: {stdout}\nstderr: {}",
                d.name,
                config_file(d.name),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The bulwarkctl context example loads, and its endpoints are the API
/// addresses the daemons' configs listen on.
#[test]
fn the_bulwarkctl_contexts_point_at_the_shipped_listeners() {
    let file = deploy_dir().join("config/bulwarkctl.yaml");
    let out = Command::new(tools::bin_path("bulwarkctl").unwrap())
        .env("HOME", std::env::temp_dir())
        .arg("--config")
        .arg(&file)
        .args(["config", "get-contexts", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let contexts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lb: BTreeSet<String> = NODES
        .iter()
        .map(|n| str_at(&node_config(n, "bulwark-lb"), "api.address").to_owned())
        .collect();
    let backup: BTreeSet<String> = NODES
        .iter()
        .map(|n| str_at(&node_config(n, "bulwark-backup"), "grpc.address").to_owned())
        .collect();
    let contexts = contexts.as_array().unwrap();
    assert!(!contexts.is_empty());
    for c in contexts {
        let set = |k: &str| -> BTreeSet<String> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(set("lb"), lb, "context {}", c["name"]);
        assert_eq!(set("backup"), backup, "context {}", c["name"]);
    }
}
