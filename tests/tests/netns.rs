//! Network namespace labs, as root: reachability, cut links, partitions,
//! latency, sockets from a host, processes on a host, cleanup.
//!
//! Every test is named `heavy_*` (nextest runs two at a time). Without root
//! they print a SKIPPED line and pass, unless BULWARK_REQUIRE_PRIVILEGED=1.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use bulwark_testkit::fixture::{
    ApiServer, ApiServerConfig, ApiServerProcess, HttpsClient, server_tls_config,
};
use bulwark_testkit::netns::{self, Netem, NetemBackend};
use bulwark_testkit::{Lab, Pki, ProcessBuilder};

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Pings until `want` is seen or `timeout` passes (links and ARP settle).
fn ping_becomes(from: &bulwark_testkit::Host, to: Ipv4Addr, want: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if from.ping(to).expect("ping runs") == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

#[test]
fn heavy_netns_ping_and_cut_link() {
    let Some(lab) = Lab::start_or_skip(2).unwrap() else {
        return;
    };
    let (h1, h2) = (lab.host(0), lab.host(1));
    assert_eq!(h1.addr(), Ipv4Addr::new(198, 18, 0, 1));
    assert!(h1.ping(h2.addr()).unwrap(), "h1 reaches h2");
    assert!(h1.ping(Ipv4Addr::LOCALHOST).unwrap(), "loopback is up");
    let arp_accept = h1
        .exec_ok("cat", ["/proc/sys/net/ipv4/conf/all/arp_accept"])
        .unwrap();
    assert_eq!(arp_accept.trim(), "1");

    lab.cut_link(h2).unwrap();
    assert!(
        !h1.ping(h2.addr()).unwrap(),
        "h2 still answers with its link cut"
    );
    lab.restore_link(h2).unwrap();
    assert!(
        ping_becomes(h1, h2.addr(), true, Duration::from_secs(5)),
        "no ping after restore_link"
    );
}

#[test]
fn heavy_netns_partition_blocks_only_the_pair() {
    let Some(lab) = Lab::start_or_skip(3).unwrap() else {
        return;
    };
    let (h1, h2, h3) = (lab.host(0), lab.host(1), lab.host(2));
    lab.partition(h1, h2).unwrap();
    assert!(!h1.ping(h2.addr()).unwrap());
    assert!(!h2.ping(h1.addr()).unwrap());
    assert!(h1.ping(h3.addr()).unwrap());
    assert!(h2.ping(h3.addr()).unwrap());
    lab.heal(h1, h2).unwrap();
    assert!(ping_becomes(h1, h2.addr(), true, Duration::from_secs(5)));

    lab.isolate(h3).unwrap();
    assert!(!h1.ping(h3.addr()).unwrap());
    assert!(h1.ping(h2.addr()).unwrap());
    lab.heal_all().unwrap();
    assert!(ping_becomes(h1, h3.addr(), true, Duration::from_secs(5)));
}

#[test]
fn heavy_netns_one_way_partition_drops_one_direction() {
    let Some(lab) = Lab::start_or_skip(2).unwrap() else {
        return;
    };
    let (h1, h2) = (lab.host(0).clone(), lab.host(1).clone());
    lab.partition_one_way(&h1, &h2).unwrap();
    // h2 -> h1 gets through, h1 -> h2 does not (UDP: no answer needed).
    assert!(udp_arrives(&h2, &h1), "h2 -> h1 should pass");
    assert!(!udp_arrives(&h1, &h2), "h1 -> h2 should be dropped");
    lab.heal(&h2, &h1).unwrap();
    assert!(udp_arrives(&h1, &h2), "h1 -> h2 after heal");
}

/// Whether a UDP datagram from `from` reaches `to` within a second (a few
/// tries, so that ARP resolution cannot lose the only datagram).
fn udp_arrives(from: &bulwark_testkit::Host, to: &bulwark_testkit::Host) -> bool {
    let to_addr = to.addr();
    let receiver = to
        .in_netns(move || std::net::UdpSocket::bind((to_addr, 0)))
        .expect("entering the namespace")
        .expect("binding a UDP socket");
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("setting a timeout");
    let target = receiver.local_addr().expect("local address");
    let from_addr = from.addr();
    let sender = from
        .in_netns(move || std::net::UdpSocket::bind((from_addr, 0)))
        .expect("entering the namespace")
        .expect("binding a UDP socket");
    let mut buf = [0u8; 16];
    (0..5).any(|_| {
        sender.send_to(b"bulwark", target).expect("sending");
        receiver
            .recv(&mut buf)
            .is_ok_and(|n| &buf[..n] == b"bulwark")
    })
}

#[tokio::test]
async fn heavy_netns_netem_adds_delay_and_loss() {
    let Some(lab) = Lab::start_or_skip(2).unwrap() else {
        return;
    };
    let (h1, h2) = (lab.host(0), lab.host(1));
    let delay = Duration::from_millis(100);
    let backend = lab
        .netem(
            h1,
            Netem {
                delay,
                loss_percent: 0.0,
            },
        )
        .unwrap();
    eprintln!("netem backend: {backend:?}");

    let rtt = h1.ping_rtt(h2.addr()).unwrap().expect("ping answered");
    assert!(rtt > delay / 2, "ping rtt {rtt:?} with {delay:?} netem");
    // The test process's own socket from h1 is delayed too (SYN leaves h1).
    let listener = h2.tcp_listener(SocketAddr::from((h2.addr(), 0))).unwrap();
    let target = listener.local_addr().unwrap();
    let started = Instant::now();
    let _stream = h1.tcp_connect(target).await.unwrap();
    assert!(
        started.elapsed() > delay / 2,
        "connect took {:?}",
        started.elapsed()
    );

    lab.netem(
        h1,
        Netem {
            delay: Duration::ZERO,
            loss_percent: 100.0,
        },
    )
    .unwrap();
    assert!(!h1.ping(h2.addr()).unwrap(), "100% loss let a ping through");

    lab.clear_netem(h1).unwrap();
    let rtt = h1
        .ping_rtt(h2.addr())
        .unwrap()
        .expect("ping answered after clear");
    assert!(rtt < delay, "rtt {rtt:?} after clear_netem");
    assert!(matches!(
        backend,
        NetemBackend::Tc | NetemBackend::Userspace
    ));
}

#[tokio::test]
async fn heavy_netns_test_process_talks_from_one_host_to_another() {
    let Some(lab) = Lab::start_or_skip(2).unwrap() else {
        return;
    };
    let (h1, h2) = (lab.host(0), lab.host(1));
    let pki = Pki::new().unwrap();

    // An in-process fixture on h2, reached from h1.
    let cert = pki.server("h2-api", &[&h2.addr().to_string()]).unwrap();
    let config = ApiServerConfig::new(
        "h2-inproc",
        server_tls_config(cert.cert_pem(), cert.key_pem()).unwrap(),
    );
    let listener = h2
        .tcp_listener(SocketAddr::from((h2.addr(), 6443)))
        .unwrap();
    let server = ApiServer::serve(listener, config).unwrap();
    let https = HttpsClient::new(pki.ca_pem()).unwrap();
    let tcp = h1.tcp_connect(server.local_addr()).await.unwrap();
    assert_eq!(tcp.local_addr().unwrap().ip(), h1.addr());
    let mut conn = https.handshake(tcp, &h2.addr().to_string()).await.unwrap();
    let response = conn.get("/readyz").await.unwrap();
    assert_eq!(response.text(), "ok");
    assert_eq!(response.backend(), Some("h2-inproc"));

    // The lab is not reachable from the root namespace. (Whether a connect
    // from there fails depends on the machine: a default route to a proxy
    // may accept any TCP connection. A TLS handshake with our CA cannot
    // succeed unless it reaches our server.)
    let root_ip = std::process::Command::new("ip")
        .args(["-o", "addr"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&root_ip.stdout).contains("198.18."),
        "lab address in the root namespace"
    );
    let served = server.controls().stats().requests;
    let from_root = tokio::time::timeout(
        Duration::from_secs(3),
        https
            .clone()
            .timeout(Duration::from_secs(2))
            .get(server.local_addr(), "/readyz"),
    )
    .await;
    assert!(
        !matches!(from_root, Ok(Ok(_))),
        "the root namespace reached the lab server"
    );
    assert_eq!(server.controls().stats().requests, served);

    // The fixture as a process on h2: spawned through `ip netns exec`,
    // controlled over its Unix socket from here.
    let process = ApiServerProcess::builder("h2-proc")
        .on_host(h2)
        .start(&pki)
        .await
        .unwrap();
    assert_eq!(process.addr().ip(), h2.addr());
    process.set_ready(false).await.unwrap();
    let tcp = h1.tcp_connect(process.addr()).await.unwrap();
    let mut conn = https.handshake(tcp, &h2.addr().to_string()).await.unwrap();
    assert_eq!(
        conn.get("/readyz").await.unwrap().status,
        http::StatusCode::INTERNAL_SERVER_ERROR
    );

    // Any program as a supervised process inside a host.
    let sleeper = h1
        .spawn(ProcessBuilder::new("h1-sleep", "/bin/sleep").arg("1000"))
        .unwrap();
    // `ip netns exec` enters the namespace just before it execs the program.
    let pid = sleeper.pid().unwrap().to_string();
    let in_h1 = || {
        let pids = std::process::Command::new("ip")
            .args(["netns", "pids", h1.netns()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&pids.stdout)
            .split_whitespace()
            .any(|p| p == pid)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !in_h1() {
        assert!(
            Instant::now() < deadline,
            "the spawned process never entered h1"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn heavy_netns_cleanup_on_drop_panic_and_sweep() {
    let Some(lab) = Lab::start_or_skip(2).unwrap() else {
        return;
    };
    let names = [
        lab.bridge_netns().to_owned(),
        lab.host(0).netns().to_owned(),
        lab.host(1).netns().to_owned(),
    ];
    assert!(names.iter().all(|n| netns_exists(n)));
    assert!(
        names
            .iter()
            .all(|n| n.starts_with(&format!("bwk{}-", std::process::id())))
    );
    drop(lab);
    assert!(
        names.iter().all(|n| !netns_exists(n)),
        "drop left namespaces"
    );

    // A panicking test cleans up as well.
    let lab_id = std::sync::Mutex::new(String::new());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::start(1).unwrap();
        *lab_id.lock().unwrap() = lab.id().to_owned();
        assert!(netns_exists(lab.host(0).netns()));
        panic!("test failure inside a lab");
    }));
    assert!(panicked.is_err());
    let lab_id = lab_id.into_inner().unwrap();
    assert!(!lab_id.is_empty());
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{lab_id}-")))
        .collect();
    assert!(leftovers.is_empty(), "a panic left {leftovers:?}");

    // Leftovers of a dead test process are swept.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("bwk{dead}-0-h1");
    let added = std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(added.success());
    let swept = netns::sweep_stale().unwrap();
    assert!(swept.contains(&stale), "{swept:?}");
    assert!(!netns_exists(&stale));
}
