//! Typed config writers: the one place tests, the demo and the bench get a
//! daemon's configuration file from.
//!
//! Each writer starts from the daemon's own config type with the daemon's
//! own defaults ([`lb`], [`prober`], [`backup`]), lets the caller set fields
//! in Rust, and serializes it with `apiVersion`/`kind` ([`write()`]). Nothing
//! here spells a field name in YAML, so a renamed or removed field breaks
//! the build of every set-up that uses it instead of a test at run time,
//! and what a test writes is exactly what the daemon parses (the round trip
//! is tested below). Tests that feed the parser bad or hand-written YAML on
//! purpose keep their literals.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bulwark_backup::config::BackupConfig;
use bulwark_common::authz::IdentityRule;
use bulwark_common::config::{API_VERSION, ComponentConfig, Overrides, from_str_with};
use bulwark_common::tls::TlsFiles;
use bulwark_lb::config::{BackendConfig, BgpPeerConfig, LbConfig, MemberConfig};
use bulwark_prober::config::{ApiserverTarget, ProberConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

use crate::CertFiles;

/// `config` as the YAML file its daemon reads: `apiVersion`, `kind`, then
/// every field (defaults included, so the file shows what the daemon runs
/// with).
pub fn to_yaml<T: ComponentConfig + Serialize>(config: &T) -> anyhow::Result<String> {
    let fields =
        serde_yaml_ng::to_value(config).with_context(|| format!("serializing a {}", T::KIND))?;
    let Value::Mapping(fields) = fields else {
        anyhow::bail!("a {} does not serialize to a mapping", T::KIND);
    };
    let mut doc = Mapping::new();
    doc.insert("apiVersion".into(), API_VERSION.into());
    doc.insert("kind".into(), T::KIND.into());
    doc.extend(fields);
    Ok(serde_yaml_ng::to_string(&doc)?)
}

/// Writes `config` to `path` (see [`to_yaml`]) and returns the path.
pub fn write<T: ComponentConfig + Serialize>(
    path: impl Into<PathBuf>,
    config: &T,
) -> anyhow::Result<PathBuf> {
    let path = path.into();
    std::fs::write(&path, to_yaml(config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Writes the part of `config` that differs from `baseline` (the daemon's
/// defaults, e.g. [`lb`] with the same node id), with `apiVersion`, `kind`
/// and the top-level `keep` fields (the required ones) always, and
/// returns the path. Such a file also starts an older build of the daemon
/// as long as the fields it sets existed then: a field added since is at
/// its default and left out, where [`write`]'s full file would be refused
/// as an unknown field. For comparing builds (`bulwark-bench datapath
/// --also-lb`); each build runs with its own defaults for the rest.
///
/// A section is pared down field by field only where that parses back to
/// the same section: a partial section takes its fields' own defaults,
/// which are not always the whole section's (an `access:` without
/// `peers` has none, while a config without `access:` has the default
/// peers), and such a section is written whole.
pub fn write_lean<T: ComponentConfig + Serialize + DeserializeOwned>(
    path: impl Into<PathBuf>,
    config: &T,
    baseline: &T,
    keep: &[&str],
) -> anyhow::Result<PathBuf> {
    let (Value::Mapping(fields), Value::Mapping(base)) = (
        serde_yaml_ng::to_value(config)?,
        serde_yaml_ng::to_value(baseline)?,
    ) else {
        anyhow::bail!("a {} does not serialize to a mapping", T::KIND);
    };
    let mut lean = Mapping::new();
    for (k, v) in &fields {
        let kept = keep.iter().any(|f| k.as_str() == Some(*f));
        let v = if kept {
            Some(v.clone())
        } else {
            differing(v.clone(), base.get(k))?
        };
        if let Some(v) = v {
            lean.insert(k.clone(), v);
        }
    }
    // Sections whose pared-down form means something else go whole.
    let back = serde_yaml_ng::to_value(serde_yaml_ng::from_value::<T>(Value::Mapping(
        lean.clone(),
    ))?)?;
    for (k, v) in &fields {
        if back.get(k) != Some(v) {
            lean.insert(k.clone(), v.clone());
        }
    }
    let mut doc = Mapping::new();
    doc.insert("apiVersion".into(), API_VERSION.into());
    doc.insert("kind".into(), T::KIND.into());
    doc.extend(lean);
    let path = path.into();
    std::fs::write(&path, serde_yaml_ng::to_string(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// What of `value` differs from `base`: mappings key by key, recursively,
/// anything else whole; `None` when nothing does. An error when `base` has
/// a field that `value` leaves out (an unset option whose default is set),
/// which a file without it could not say.
fn differing(value: Value, base: Option<&Value>) -> anyhow::Result<Option<Value>> {
    let Some(base) = base else {
        return Ok(Some(value));
    };
    if &value == base {
        return Ok(None);
    }
    let (Value::Mapping(fields), Value::Mapping(base)) = (&value, base) else {
        return Ok(Some(value));
    };
    if let Some((missing, _)) = base.iter().find(|(k, _)| !fields.contains_key(*k)) {
        anyhow::bail!("{missing:?} is set by default and unset here: a lean file cannot say so");
    }
    let mut kept = Mapping::new();
    for (k, v) in fields {
        if let Some(v) = differing(v.clone(), base.get(k))? {
            kept.insert(k.clone(), v);
        }
    }
    Ok(Some(Value::Mapping(kept)))
}

/// `config` as its daemon reads it from a file: serialized, parsed and
/// validated (not preflighted). For in-process tests that hand the config
/// to `run` directly, so it has passed the same checks as a file would.
pub fn validated<T: ComponentConfig + Serialize>(config: &T) -> anyhow::Result<T> {
    let text = to_yaml(config)?;
    Ok(from_str_with(Some(&text), None, &Overrides::new())?)
}

/// A config of type `T` with only `required` given: every other field is
/// the daemon's default, from the type's own serde defaults.
fn defaults<T: DeserializeOwned>(required: Mapping) -> T {
    serde_yaml_ng::from_value(Value::Mapping(required))
        .unwrap_or_else(|e| panic!("the daemon's defaults do not parse: {e}"))
}

/// A bulwark-lb config for node `node_id` with every other field at its
/// default.
pub fn lb(node_id: u64) -> LbConfig {
    defaults(Mapping::from_iter([("nodeId".into(), node_id.into())]))
}

/// A bulwark-prober config with every field at its default.
pub fn prober() -> ProberConfig {
    defaults(Mapping::new())
}

/// A bulwark-backup config with every field at its default.
pub fn backup() -> BackupConfig {
    defaults(Mapping::new())
}

/// The `tls:` section for a certificate from the test PKI.
pub fn tls(cert: &CertFiles) -> TlsFiles {
    TlsFiles {
        cert_file: cert.cert.clone(),
        key_file: cert.key.clone(),
        ca_file: cert.ca.clone(),
    }
}

/// An access rule admitting these certificate organizations.
pub fn orgs(organizations: &[&str]) -> IdentityRule {
    IdentityRule {
        common_names: Vec::new(),
        organizations: organizations.iter().map(|o| (*o).to_owned()).collect(),
    }
}

/// One of an LB cluster's `initialMembers`.
pub fn lb_member(
    id: u64,
    name: &str,
    zone: &str,
    raft: SocketAddr,
    api: SocketAddr,
) -> MemberConfig {
    MemberConfig {
        id,
        name: Some(name.to_owned()),
        raft_address: raft.to_string(),
        api_address: api.to_string(),
        proxy_address: String::new(),
        zone: zone.to_owned(),
    }
}

/// A backend seeded from an LB config, at the daemon's default weight.
pub fn lb_backend(id: &str, address: SocketAddr, zone: &str) -> BackendConfig {
    defaults(Mapping::from_iter([
        ("id".into(), id.into()),
        ("address".into(), address.to_string().into()),
        ("zone".into(), zone.into()),
    ]))
}

/// A BGP peer of a bgp-mode VIP, hold time and port at the defaults.
pub fn bgp_peer(address: IpAddr, asn: u32) -> BgpPeerConfig {
    defaults(Mapping::from_iter([
        ("address".into(), address.to_string().into()),
        ("asn".into(), asn.into()),
    ]))
}

/// The node of `members` with id `id` as every LB cluster set-up here runs
/// it: its member's name, zone and Raft and API addresses, `tls` from
/// `cert`, its data under `data_dir`, operators `system:masters`, peers
/// `bulwark:lb`, and the cluster formed from `members`. The rest is the
/// daemon's default, for the caller to set (VIP, backends, admin, timers).
pub fn lb_node(
    members: &[MemberConfig],
    id: u64,
    cert: &CertFiles,
    data_dir: &Path,
) -> anyhow::Result<LbConfig> {
    let member = members
        .iter()
        .find(|m| m.id == id)
        .with_context(|| format!("no member with id {id}"))?;
    let mut c = lb(id);
    c.name.clone_from(&member.name);
    c.zone.clone_from(&member.zone);
    c.data_dir = data_dir.to_owned();
    c.raft.address = member
        .raft_address
        .parse()
        .with_context(|| format!("raftAddress {:?}", member.raft_address))?;
    c.api.address = member
        .api_address
        .parse()
        .with_context(|| format!("apiAddress {:?}", member.api_address))?;
    c.tls = tls(cert);
    c.access.operators = orgs(&["system:masters"]);
    c.access.peers = Some(orgs(&["bulwark:lb"]));
    c.initial_members = members.to_vec();
    Ok(c)
}

/// An apiserver a prober probes.
pub fn apiserver_target(id: &str, address: SocketAddr, zone: &str) -> ApiserverTarget {
    ApiserverTarget {
        id: id.to_owned(),
        address: address.to_string(),
        zone: zone.to_owned(),
        server_name: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a writer wrote, parsed back the way the daemon parses it.
    fn parsed<T: ComponentConfig + Serialize>(config: &T) -> T {
        validated(config).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn as_value<T: Serialize>(t: &T) -> Value {
        serde_yaml_ng::to_value(t).expect("serializes")
    }

    #[test]
    fn a_lean_file_holds_what_differs_from_the_defaults_and_parses_back() {
        let pki = crate::Pki::new().expect("pki");
        let cert = pki
            .peer("lb-1", &["bulwark:lb"], &["127.0.0.1"])
            .expect("cert");
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let members = [lb_member(1, "lb-1", "a", a(9441), a(9442))];
        let dir = tempfile::tempdir().expect("dir");
        let mut c = lb_node(&members, 1, &cert, dir.path()).expect("node");
        c.proxy.splice = false;
        let path = write_lean(dir.path().join("lb.yaml"), &c, &lb(1), &["nodeId"]).expect("lean");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with(&format!(
                "apiVersion: {API_VERSION}\nkind: LoadBalancerConfiguration\nnodeId: 1\n"
            )),
            "{text}"
        );
        assert!(text.contains("proxy:\n  splice: false\n"), "{text}");
        // A partial `access:` would lose the default peers: written whole.
        assert!(text.contains("peers:"), "{text}");
        assert!(
            !text.contains("connectTimeout"),
            "a default was written:\n{text}"
        );
        let back: LbConfig = from_str_with(Some(&text), None, &Overrides::new())
            .unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(back, c);
    }

    #[test]
    fn lb_config_round_trips_through_the_daemons_parser() {
        let pki = crate::Pki::new().expect("pki");
        let cert = pki
            .peer("lb-1", &["bulwark:lb"], &["127.0.0.1"])
            .expect("cert");
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let members = [
            lb_member(1, "lb-1", "a", a(9441), a(9442)),
            lb_member(2, "lb-2", "b", a(9451), a(9452)),
        ];
        let mut c = lb_node(&members, 1, &cert, Path::new("/tmp/lb-data")).expect("node");
        c.backends = vec![lb_backend("api-1", a(6443), "a")];
        c.access.probers = Some(orgs(&["bulwark:probers"]));
        c.local_listener = Some(a(7445));
        let back = parsed(&c);
        assert_eq!(back, c);
        assert_eq!(back.name.as_deref(), Some("lb-1"));
        assert_eq!(back.zone, "a");
        assert_eq!(back.raft.address, a(9441));
        assert_eq!(back.initial_members.len(), 2);
        assert_eq!(back.backends[0].weight, 100, "the daemon's default weight");
    }

    #[test]
    fn prober_and_backup_configs_round_trip_through_the_daemons_parser() {
        let pki = crate::Pki::new().expect("pki");
        let cert = pki.client("prober-a", &["bulwark:probers"]).expect("cert");
        let mut p = prober();
        p.node_name = "prober-a".into();
        p.zone = "a".into();
        p.apiservers.tls.ca_file = pki.ca_path().to_owned();
        p.apiservers.targets = vec![apiserver_target(
            "api-a",
            SocketAddr::from(([127, 0, 0, 1], 6443)),
            "a",
        )];
        p.report.endpoints = vec!["127.0.0.1:9442".into()];
        p.report.tls = tls(&cert);
        assert_eq!(parsed(&p), p);

        let mut b = backup();
        b.node_name = "node-a".into();
        b.grpc.tls = tls(&pki
            .peer("backup-a", &["bulwark:backup"], &["127.0.0.1"])
            .expect("cert"));
        b.etcd.tls = None;
        b.store.url = "file:///tmp/backups".into();
        // BackupConfig has no PartialEq: compare what each serializes to.
        assert_eq!(as_value(&parsed(&b)), as_value(&b));
    }

    #[test]
    fn the_file_names_its_kind() {
        let text = to_yaml(&lb(3)).expect("serializes");
        assert!(
            text.starts_with(&format!(
                "apiVersion: {API_VERSION}\nkind: LoadBalancerConfiguration\n"
            )),
            "{text}"
        );
    }
}
