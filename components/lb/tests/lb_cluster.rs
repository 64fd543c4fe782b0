//! Real `bulwark-lb` processes on loopback, bind-mode VIP: leadership and
//! VIP failover, durability across restarts, wiped nodes, access control.

// Helpers outside #[test] fns fail the test loudly too.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bulwark_api::lb::v1 as lb;
use bulwark_api::time::duration_from_proto;
use bulwark_testkit::cluster::{LbCluster, Options, echo_backend, echo_through};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_sigkill_of_the_leader_moves_the_vip() {
    let (backend, _b) = echo_backend().await;
    let mut c = LbCluster::start(Options {
        nodes: 3,
        backends: vec![("api-1".into(), backend)],
        vip: None,
        snapshot_every: None,
        ..Default::default()
    })
    .await;
    let holder = c.wait_for_holder(None, Duration::from_secs(10)).await;
    assert_eq!(c.holders().await, vec![holder], "exactly one holder");
    // The registry comes from the configuration, seeded by the first
    // leader once it leads.
    let list = c.wait_for_backends(holder, 1).await;
    assert_eq!(list.backends[0].id, "api-1");
    assert_eq!(echo_through(c.vip, b"ping").await.unwrap(), b"ping");

    let killed_at = Instant::now();
    c.node_mut(holder).process.kill().unwrap();
    let new = c
        .wait_for_holder(Some(holder), Duration::from_secs(15))
        .await;
    let gap = killed_at.elapsed();
    eprintln!(
        "VIP moved from node {holder} to node {new}; client-visible gap {gap:?} (figures belong to bench/)"
    );
    assert!(gap < Duration::from_secs(10), "generous bound: {gap:?}");
    assert_eq!(echo_through(c.vip, b"pong").await.unwrap(), b"pong");

    // The new holder recorded the failover with its measurements.
    let f = &c.wait_for_failover(new, new).await;
    assert_eq!(f.from_node_id, Some(holder));
    assert_eq!(f.cause, lb::FailoverCause::LeaderLost as i32);
    assert!(f.time_to_detect.is_some() && f.time_to_move_vip.is_some());
    // Detection counts from the old holder's last append the new one
    // accepted, which came before the kill: it cannot exceed the gap
    // clients saw by more than a heartbeat interval (a stale "last
    // append" would make it seconds longer).
    let detect =
        bulwark_api::time::duration_from_proto(f.time_to_detect.as_ref().unwrap()).unwrap();
    assert!(
        detect <= gap + Duration::from_millis(500),
        "detection {detect:?} against a gap of {gap:?}"
    );
    // Its role metrics follow the election it won: leader, in a later
    // term than the one it started in, one election counted.
    let admin = c.node(new).admin;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (leader, term, elections) = loop {
        let (_, text) = bulwark_testkit::admin::http_get(admin, "/metrics").await;
        let value = |name: &str| unlabelled_value(&text, name);
        let read = (
            value("bulwark_lb_is_leader"),
            value("bulwark_lb_term"),
            value("bulwark_lb_elections_total"),
        );
        if read.0 == 1.0 || Instant::now() > deadline {
            break read;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(leader, 1.0, "bulwark_lb_is_leader on the new holder");
    assert!(
        term >= 2.0 && elections >= 1.0,
        "term {term}, elections {elections}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_state_survives_restarts_of_a_follower_then_the_leader() {
    let (backend, _b) = echo_backend().await;
    let mut c = LbCluster::start(Options {
        nodes: 3,
        backends: vec![],
        vip: None,
        snapshot_every: None,
        ..Default::default()
    })
    .await;
    let leader = c.wait_for_holder(None, Duration::from_secs(10)).await;
    c.client(leader)
        .add_backend(lb::AddBackendRequest {
            id: "api-1".into(),
            address: backend.to_string(),
            zone: "a".into(),
            weight: Some(7),
            drained: false,
        })
        .await
        .unwrap();
    c.client(leader)
        .drain_backend(lb::DrainBackendRequest {
            id: "api-1".into(),
            max_drain_duration: None,
        })
        .await
        .unwrap();

    let follower = c
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != leader)
        .unwrap();
    // The write was acknowledged once a quorum had it; the restarted
    // follower may be the one that had not applied it yet, so it may need
    // a moment after restart to catch up. What must never happen is that a
    // node shows an older state than it had applied before it stopped.
    let settled = |c: &LbCluster, id: u64| {
        let mut client = c.client(id);
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let list = client
                    .list_backends(lb::ListBackendsRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                let ok = list.backends.len() == 1 && {
                    let b = &list.backends[0];
                    (b.id.as_str(), b.weight, b.zone.as_str()) == ("api-1", 7, "a")
                        && b.admin_state == lb::AdminState::Drain as i32
                };
                if ok {
                    return list.applied_index;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {id} lists {:?}",
                    list.backends
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let before = settled(&c, follower).await;
    c.node_mut(follower).process.restart().await.unwrap();
    let api = c.node(follower).api;
    c.node(follower)
        .process
        .wait_for_port(api, Duration::from_secs(20))
        .await
        .unwrap();
    // Straight from disk: applied state at least as new as before the stop.
    let list = c
        .client(follower)
        .list_backends(lb::ListBackendsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.applied_index >= before,
        "{} < {before}",
        list.applied_index
    );
    assert_eq!(list.backends.len(), 1, "read from disk after restart");
    settled(&c, follower).await;

    settled(&c, leader).await;
    c.node_mut(leader).process.restart().await.unwrap();
    let api = c.node(leader).api;
    c.node(leader)
        .process
        .wait_for_port(api, Duration::from_secs(20))
        .await
        .unwrap();
    let holder = c.wait_for_holder(None, Duration::from_secs(15)).await;
    for id in [leader, holder] {
        settled(&c, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_wiped_node_rejoins_only_when_an_operator_adds_it() {
    let mut c = LbCluster::start(Options {
        nodes: 3,
        backends: vec![],
        vip: None,
        snapshot_every: Some(10),
        ..Default::default()
    })
    .await;
    let leader = c.wait_for_holder(None, Duration::from_secs(10)).await;
    // Wipe a follower that is not the bootstrapper's peer of choice: any.
    let wiped = c
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != leader)
        .unwrap();
    {
        let n = c.node_mut(wiped);
        n.process.stop().await.unwrap();
        std::fs::remove_dir_all(&n.data_dir).unwrap();
        n.process.start().unwrap();
    }
    let wiped_api = c.node(wiped).api;
    c.node(wiped)
        .process
        .wait_for_port(wiped_api, Duration::from_secs(20))
        .await
        .unwrap();
    // It does not take part: the leader's appends are refused, it knows no
    // leader, and the others carry on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = c.status(wiped).await.unwrap();
    assert!(
        s.leader.is_none(),
        "a wiped node must not follow by itself: {s:?}"
    );
    assert_eq!(s.applied_index, 0);
    c.client(leader)
        .add_backend(lb::AddBackendRequest {
            id: "after-wipe".into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Enough writes that the leader snapshots (every 10 entries) and purges
    // the log behind it: the re-added node must be sent the snapshot.
    for i in 0..30 {
        c.client(leader)
            .add_backend(lb::AddBackendRequest {
                id: format!("filler-{i}"),
                address: "127.0.0.1:9".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // Adding it while it is still a member is refused with the way out.
    let node_info = |id: u64, c: &LbCluster| lb::NodeInfo {
        id,
        name: format!("lb-{id}"),
        raft_address: c.node(id).raft.to_string(),
        api_address: c.node(id).api.to_string(),
        ..Default::default()
    };
    let err = c
        .client(leader)
        .add_member(lb::AddMemberRequest {
            node: Some(node_info(wiped, &c)),
            stay_learner: false,
            catch_up_timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    assert!(err.message().contains("remove it first"), "{err}");

    c.client(leader)
        .remove_member(lb::RemoveMemberRequest {
            node_id: wiped,
            force: false,
        })
        .await
        .unwrap();
    let added = c
        .client(leader)
        .add_member(lb::AddMemberRequest {
            node: Some(node_info(wiped, &c)),
            stay_learner: false,
            catch_up_timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.member.unwrap().role, lb::MemberRole::Voter as i32);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = c
            .client(wiped)
            .list_backends(lb::ListBackendsRequest::default())
            .await
            .unwrap()
            .into_inner();
        if list.backends.iter().any(|b| b.id == "after-wipe") {
            assert_eq!(list.backends.len(), 31);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the re-added node did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_access_control_and_precise_errors() {
    let c = LbCluster::start(Options {
        nodes: 3,
        backends: vec![],
        vip: None,
        snapshot_every: None,
        ..Default::default()
    })
    .await;
    let leader = c.wait_for_holder(None, Duration::from_secs(10)).await;
    let follower = c
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != leader)
        .unwrap();

    // A non-operator may read but not change anything.
    let mut viewer = c.client_as(leader, &c.viewer);
    viewer
        .get_status(lb::GetStatusRequest::default())
        .await
        .unwrap();
    let err = viewer
        .drain_backend(lb::DrainBackendRequest {
            id: "x".into(),
            max_drain_duration: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = viewer
        .add_member(lb::AddMemberRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // The Raft port accepts LB peers only.
    let raft_addr = c.node(leader).raft.to_string();
    for tls in [&c.operator, &c.viewer] {
        let mut raft = bulwark_api::raft::v1::raft_client::RaftClient::new(
            bulwark_common::grpc::channel(&raft_addr, tls, None).unwrap(),
        );
        let err = raft
            .get_node_state(bulwark_api::raft::v1::GetNodeStateRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    }

    let mut op = c.client(leader);
    let err = op
        .drain_backend(lb::DrainBackendRequest {
            id: "nope".into(),
            max_drain_duration: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{err}");
    let err = op
        .add_backend(lb::AddBackendRequest {
            id: "api-1".into(),
            address: "not-an-address".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("field `address`"), "{err}");
    let err = op
        .remove_member(lb::RemoveMemberRequest {
            node_id: 42,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

    // A follower points writes at the leader.
    let err = c
        .client(follower)
        .add_backend(lb::AddBackendRequest {
            id: "api-2".into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let hint = bulwark_api::leader_hint::from_status(&err).unwrap();
    assert_eq!(hint.node_id, leader);
    assert_eq!(hint.address, c.node(leader).api.to_string());
}

#[tokio::test]
async fn check_config_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.yaml");
    std::fs::write(
        &path,
        "apiVersion: bulwark.dev/v1alpha1\nkind: LoadBalancerConfiguration\nnodeId: 1\nraft:\n  address: 127.0.0.1:1\n  electionTimeoutMin: soon\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(bulwark_testkit::tools::bin_path("bulwark-lb").unwrap())
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("raft.electionTimeoutMin: invalid duration \"soon\""),
        "{err}"
    );
}

/// Runs `bulwarkctl -o json ARGS` as the operator against every node's API.
async fn ctl(c: &LbCluster, args: &[&str]) -> serde_json::Value {
    let endpoints: Vec<String> = c.nodes.iter().map(|n| n.api.to_string()).collect();
    let out = tokio::process::Command::new(bulwark_testkit::tools::bin_path("bulwarkctl").unwrap())
        .arg(format!("--lb-endpoint={}", endpoints.join(",")))
        .arg(format!("--ca={}", c.operator_files.ca.display()))
        .arg(format!("--cert={}", c.operator_files.cert.display()))
        .arg(format!("--key={}", c.operator_files.key.display()))
        .args(["-o", "json", "lb"])
        // No context file: everything comes from the flags.
        .env("HOME", c.operator_files.ca.parent().unwrap())
        .env_remove("BULWARKCTL_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "bulwarkctl lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_bulwarkctl_lb_commands() {
    let (backend, _b) = echo_backend().await;
    let c = LbCluster::start(Options {
        nodes: 3,
        backends: vec![("api-1".into(), backend)],
        vip: None,
        snapshot_every: None,
        ..Default::default()
    })
    .await;
    let holder = c.wait_for_holder(None, Duration::from_secs(10)).await;
    c.wait_for_backends(holder, 1).await;

    let status = ctl(&c, &["status"]).await;
    assert_eq!(status["leader"], format!("{holder} (lb-{holder})"));
    let members = ctl(&c, &["members"]).await;
    assert_eq!(members.as_array().unwrap().len(), 3);
    // Writes reach the leader whichever endpoint answers first.
    let drained = ctl(&c, &["drain", "api-1"]).await;
    assert_eq!(drained[0]["admin"], "drain");
    assert_eq!(drained[0]["routable"], false);
    let backends = ctl(&c, &["backends"]).await;
    assert_eq!(backends[0]["admin"], "drain");
    let undrained = ctl(&c, &["undrain", "api-1"]).await;
    assert_eq!(undrained[0]["admin"], "active");
    ctl(
        &c,
        &[
            "add-backend",
            "api-2",
            "--address",
            "127.0.0.1:9",
            "--weight",
            "5",
        ],
    )
    .await;
    let updated = ctl(
        &c,
        &[
            "update-backend",
            "api-2",
            "--weight",
            "50",
            "--zone",
            "zone-b",
        ],
    )
    .await;
    assert_eq!(updated[0]["weight"], 50);
    assert_eq!(updated[0]["zone"], "zone-b");
    assert_eq!(updated[0]["address"], "127.0.0.1:9");
    let backends = ctl(&c, &["backends", "--zone", "zone-b"]).await;
    assert_eq!(backends[0]["id"], "api-2");
    assert_eq!(backends[0]["weight"], 50);
    ctl(&c, &["remove-backend", "api-2"]).await;
    let backends = ctl(&c, &["backends"]).await;
    assert_eq!(backends.as_array().unwrap().len(), 1);

    // lb.yaml seeded api-1 with weight 100: every node says its file and
    // the registry part, and again when they match.
    ctl(&c, &["update-backend", "api-1", "--weight", "7"]).await;
    every_log_says(&c, "set otherwise in lb.yaml: api-1: weight 100 → 7").await;
    ctl(&c, &["update-backend", "api-1", "--weight", "100"]).await;
    every_log_says(&c, "lb.yaml's backends match the registry again").await;
}

/// Waits until every node's log holds `line`.
async fn every_log_says(c: &LbCluster, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in &c.nodes {
        while !node.process.log().contains(line) {
            assert!(
                Instant::now() < deadline,
                "lb-{} never logged {line:?}:\n{}",
                node.id,
                node.process.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_sigterm_on_the_leader_releases_then_hands_over() {
    let mut c = LbCluster::start(Options {
        nodes: 3,
        backends: vec![],
        vip: None,
        snapshot_every: None,
        ..Default::default()
    })
    .await;
    let leader = c.wait_for_holder(None, Duration::from_secs(10)).await;
    c.node(leader).process.terminate().unwrap();
    let new = c
        .wait_for_holder(Some(leader), Duration::from_secs(10))
        .await;
    let status = c
        .node_mut(leader)
        .process
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
    let f = &c.wait_for_failover(new, new).await;
    assert_eq!(f.cause, lb::FailoverCause::Transfer as i32, "{f:?}");
    let log = c.node(leader).process.log();
    assert!(
        log.contains("released the VIP"),
        "the VIP goes first:\n{log}"
    );
    assert!(log.contains("handing leadership over"), "{log}");
}

/// A node restarted with a longer VIP lease than its peers': every node
/// learns its timers over Raft and says so, and a new leader waits out that
/// node's longer hold before it claims, though its own is shorter: after a
/// transfer the whole hold, after a normal election the rest of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_a_node_with_a_longer_lease_makes_every_claim_wait_out_its_hold() {
    let mut c = LbCluster::start(Options {
        nodes: 3,
        ..Default::default()
    })
    .await;
    let holder = c.wait_for_holder(None, Duration::from_secs(10)).await;
    let slow = c
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|&id| id != holder)
        .unwrap();
    // vip.lease 400 ms: a hold of (400 + 10) / 0.99 + 25 = 439.1 ms, so a
    // claim after a normal election waits 439.1 × 1.01 − 220 = 223.5 ms.
    let node = c.node_mut(slow);
    node.process.stop().await.unwrap();
    set_vip_lease(&node.config, "400ms");
    node.process.start().unwrap();
    let api = node.api;
    node.process
        .wait_for_port(api, Duration::from_secs(30))
        .await
        .unwrap();

    for n in &c.nodes {
        let differing = if n.id == slow { 2.0 } else { 1.0 };
        let (got, delay) = wait_for_fence_metrics(n.admin, differing).await;
        eprintln!("node {}: {got} peers differ, claim delay {delay} s", n.id);
        assert_eq!(got, differing, "node {}", n.id);
        assert!((0.220..0.227).contains(&delay), "node {}: {delay}", n.id);
    }
    let log = c.node(holder).process.log();
    assert!(
        log.contains(&format!("node {slow} runs other fence timers")),
        "{log}"
    );
    // ListMembers (`bulwarkctl lb members`) shows each node's timers and
    // the wait.
    let list = c
        .client(holder)
        .list_members(lb::ListMembersRequest {})
        .await
        .unwrap()
        .into_inner();
    let ms = |d: &Option<prost_types::Duration>| {
        duration_from_proto(d.as_ref().unwrap())
            .unwrap()
            .as_secs_f64()
            * 1e3
    };
    for m in &list.members {
        let t = m.fence_timers.unwrap();
        let id = m.node.as_ref().unwrap().id;
        let hold = if id == slow { 439.142 } else { 186.617 };
        assert!((ms(&t.hold) - hold).abs() < 0.01, "node {id}: {t:?}");
        assert_eq!(ms(&t.election_timeout_max), 220.0, "node {id}");
    }
    assert!((ms(&list.claim_delay) - 223.5).abs() < 0.1, "{list:?}");

    // A transfer to the third node, which runs the defaults (its own hold
    // is 186.6 ms): it waits out the slow node's, 439.1 × 1.01 = 443.5 ms.
    let other = c
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|&id| id != holder && id != slow)
        .unwrap();
    let moved = c
        .client(holder)
        .transfer_leadership(lb::TransferLeadershipRequest {
            to_node_id: Some(other),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.new_leader.map(|n| n.id), Some(other));
    let f = &c.wait_for_failover(other, other).await;
    assert_eq!(f.cause, lb::FailoverCause::Transfer as i32, "{f:?}");
    assert_claimed_after(f, Duration::from_micros(443_500));

    c.node_mut(other).process.kill().unwrap();
    let new = c
        .wait_for_holder(Some(other), Duration::from_secs(15))
        .await;
    assert_claimed_after(
        &c.wait_for_failover(new, new).await,
        Duration::from_millis(223),
    );
}

/// The failover's claim came at least `delay` after the election.
fn assert_claimed_after(f: &lb::Failover, delay: Duration) {
    let waited = duration_from_proto(f.time_to_move_vip.as_ref().unwrap()).unwrap();
    eprintln!(
        "node {} took the VIP {waited:?} after its election",
        f.to_node_id
    );
    assert!(waited >= delay, "{f:?}");
}

/// Rewrites `vip.lease` in a node's config file.
fn set_vip_lease(config: &std::path::Path, lease: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    doc["vip"]["lease"] = lease.into();
    std::fs::write(config, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
}

/// The value of an unlabelled metric in a `/metrics` text; NaN when absent.
fn unlabelled_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// Polls `/metrics` until `bulwark_lb_fence_peers_differing` reads
/// `differing`; returns it (the last value read, at the deadline) and the
/// claim delay in seconds.
async fn wait_for_fence_metrics(admin: std::net::SocketAddr, differing: f64) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = bulwark_testkit::admin::http_get(admin, "/metrics").await;
        let value = |name: &str| unlabelled_value(&text, name);
        let got = value("bulwark_lb_fence_peers_differing");
        if got == differing || Instant::now() > deadline {
            return (got, value("bulwark_lb_fence_claim_delay_seconds"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
