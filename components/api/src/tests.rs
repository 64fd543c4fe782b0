//! Tests of the generated surface and the wire helpers.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use prost::Message;
use prost_types::FileDescriptorSet;
use tonic::Code;

use crate::leader_hint::{self, LEADER_ADDR_KEY, LEADER_ID_KEY};
use crate::time::{
    MAX_DURATION_SECONDS, MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS, TimeError,
    duration_from_proto, duration_to_proto, timestamp_from_proto, timestamp_to_proto,
};
use crate::{Access, METHOD_ACCESS, backup, lb, method_access, raft};

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

/// Every rpc in the descriptor set, as gRPC paths.
fn all_method_paths() -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for file in descriptor_set().file {
        for service in &file.service {
            for method in &service.method {
                paths.insert(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    paths
}

// ---------------------------------------------------------------------------
// Descriptor set and service names
// ---------------------------------------------------------------------------

#[test]
fn descriptor_set_has_every_service_with_its_full_name() {
    let services: BTreeSet<String> = descriptor_set()
        .file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect();
    let expected: BTreeSet<String> = [
        "bulwark.lb.v1.LoadBalancer",
        "bulwark.lb.v1.ProbeReports",
        "bulwark.lb.v1.BackendWatch",
        "bulwark.backup.v1.Backup",
        "bulwark.backup.v1.RestoreAgent",
        "bulwark.raft.v1.Raft",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(services, expected);

    // The constants servers use for grpc.health.v1 name the same services.
    let constants: BTreeSet<String> = crate::LB_SERVICES
        .iter()
        .chain(crate::BACKUP_SERVICES)
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(constants, expected);
    assert_eq!(crate::LOAD_BALANCER_SERVICE, "bulwark.lb.v1.LoadBalancer");
    assert_eq!(
        crate::RESTORE_AGENT_SERVICE,
        "bulwark.backup.v1.RestoreAgent"
    );
    assert_eq!(crate::RAFT_SERVICE, "bulwark.raft.v1.Raft");
}

#[test]
fn descriptor_set_has_the_expected_rpcs() {
    let paths = all_method_paths();
    for path in [
        "/bulwark.lb.v1.LoadBalancer/GetStatus",
        "/bulwark.lb.v1.LoadBalancer/TransferLeadership",
        "/bulwark.lb.v1.LoadBalancer/GetHealth",
        "/bulwark.lb.v1.ProbeReports/Report",
        "/bulwark.lb.v1.BackendWatch/Watch",
        "/bulwark.backup.v1.Backup/CreateSnapshot",
        "/bulwark.backup.v1.Backup/Restore",
        "/bulwark.backup.v1.RestoreAgent/PrepareRestore",
        "/bulwark.backup.v1.RestoreAgent/AbortRestore",
        "/bulwark.raft.v1.Raft/AppendEntries",
        "/bulwark.raft.v1.Raft/Vote",
        "/bulwark.raft.v1.Raft/InstallSnapshot",
        "/bulwark.raft.v1.Raft/TransferLeader",
    ] {
        assert!(
            paths.contains(path),
            "{path} missing from the descriptor set"
        );
    }
}

#[test]
fn descriptor_set_is_self_contained_for_reflection() {
    // Reflection clients resolve imports by file name; every import must be
    // served too, or grpcurl fails on google.protobuf.Timestamp.
    let set = descriptor_set();
    let names: BTreeSet<&str> = set.file.iter().map(|f| f.name()).collect();
    for file in &set.file {
        for dep in &file.dependency {
            assert!(
                names.contains(dep.as_str()),
                "{} imports missing {dep}",
                file.name()
            );
        }
    }
    // Comments are kept, so `grpcurl describe` shows them.
    let lb = set
        .file
        .iter()
        .find(|f| f.name() == "bulwark/lb/v1/lb.proto")
        .expect("lb.proto present");
    assert!(lb.source_code_info.is_some());
}

#[test]
fn every_rpc_declares_its_access_and_destructive_ones_need_an_operator() {
    let table: BTreeSet<String> = METHOD_ACCESS.iter().map(|(p, _)| (*p).to_owned()).collect();
    assert_eq!(table, all_method_paths());
    assert!(METHOD_ACCESS.iter().all(|(_, a)| *a != Access::Unspecified));
    assert!(
        METHOD_ACCESS.windows(2).all(|w| w[0].0 < w[1].0),
        "sorted for binary search"
    );

    for path in [
        "/bulwark.backup.v1.Backup/Restore",
        "/bulwark.backup.v1.Backup/DeleteSnapshot",
        "/bulwark.lb.v1.LoadBalancer/AddMember",
        "/bulwark.lb.v1.LoadBalancer/RemoveMember",
        "/bulwark.lb.v1.LoadBalancer/DrainBackend",
        "/bulwark.lb.v1.LoadBalancer/RemoveBackend",
        "/bulwark.lb.v1.LoadBalancer/TransferLeadership",
    ] {
        assert_eq!(method_access(path), Some(Access::Operator), "{path}");
    }
    assert_eq!(
        method_access("/bulwark.lb.v1.LoadBalancer/GetStatus"),
        Some(Access::Read)
    );
    assert_eq!(
        method_access("/bulwark.lb.v1.ProbeReports/Report"),
        Some(Access::Prober)
    );
    assert_eq!(
        method_access("/bulwark.raft.v1.Raft/Vote"),
        Some(Access::Peer)
    );
    assert_eq!(
        method_access("/bulwark.backup.v1.RestoreAgent/RestoreMember"),
        Some(Access::Peer)
    );
    assert_eq!(method_access("/grpc.health.v1.Health/Check"), None);
    assert_eq!(method_access(""), None);
}

// ---------------------------------------------------------------------------
// Time conversions
// ---------------------------------------------------------------------------

#[test]
fn durations_round_trip() {
    for d in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_millis(1500),
        Duration::new(MAX_DURATION_SECONDS as u64, 999_999_999),
    ] {
        let proto = duration_to_proto(d).expect("in range");
        assert_eq!(duration_from_proto(&proto), Ok(d));
    }
    let proto = duration_to_proto(Duration::from_millis(1500)).expect("in range");
    assert_eq!((proto.seconds, proto.nanos), (1, 500_000_000));
}

#[test]
fn durations_reject_bad_values() {
    let too_long = Duration::from_secs(MAX_DURATION_SECONDS as u64 + 1);
    assert_eq!(
        duration_to_proto(too_long),
        Err(TimeError::DurationOutOfRange)
    );
    assert_eq!(
        duration_to_proto(Duration::MAX),
        Err(TimeError::DurationOutOfRange)
    );

    let pd = |seconds, nanos| prost_types::Duration { seconds, nanos };
    assert_eq!(
        duration_from_proto(&pd(-1, 0)),
        Err(TimeError::NegativeDuration {
            seconds: -1,
            nanos: 0
        })
    );
    assert_eq!(
        duration_from_proto(&pd(0, -5)),
        Err(TimeError::NegativeDuration {
            seconds: 0,
            nanos: -5
        })
    );
    assert_eq!(
        duration_from_proto(&pd(1, -5)),
        Err(TimeError::InvalidNanos { nanos: -5 })
    );
    assert_eq!(
        duration_from_proto(&pd(-1, 5)),
        Err(TimeError::InvalidNanos { nanos: 5 })
    );
    assert_eq!(
        duration_from_proto(&pd(0, 1_000_000_000)),
        Err(TimeError::InvalidNanos {
            nanos: 1_000_000_000
        })
    );
    assert_eq!(
        duration_from_proto(&pd(MAX_DURATION_SECONDS + 1, 0)),
        Err(TimeError::DurationOutOfRange)
    );
    assert_eq!(
        duration_from_proto(&pd(i64::MIN, i32::MIN)),
        Err(TimeError::InvalidNanos { nanos: i32::MIN })
    );
}

#[test]
fn timestamps_round_trip() {
    let now = SystemTime::now();
    let cases = [
        UNIX_EPOCH,
        now,
        UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
        // Before the epoch with a fraction: seconds borrow, nanos stay >= 0.
        UNIX_EPOCH - Duration::new(1, 250_000_000),
        UNIX_EPOCH - Duration::from_secs(MIN_TIMESTAMP_SECONDS.unsigned_abs()),
        UNIX_EPOCH + Duration::new(MAX_TIMESTAMP_SECONDS as u64, 999_999_999),
    ];
    for t in cases {
        let proto = timestamp_to_proto(t).expect("in range");
        assert!((0..1_000_000_000).contains(&proto.nanos));
        assert_eq!(timestamp_from_proto(&proto), Ok(t));
    }
    let proto = timestamp_to_proto(UNIX_EPOCH - Duration::new(1, 250_000_000)).expect("in range");
    assert_eq!((proto.seconds, proto.nanos), (-2, 750_000_000));
}

#[test]
fn timestamps_reject_bad_values() {
    let after_9999 = UNIX_EPOCH + Duration::from_secs(MAX_TIMESTAMP_SECONDS as u64 + 1);
    assert_eq!(
        timestamp_to_proto(after_9999),
        Err(TimeError::TimestampOutOfRange)
    );
    let before_0001 = UNIX_EPOCH - Duration::from_secs(MIN_TIMESTAMP_SECONDS.unsigned_abs() + 1);
    assert_eq!(
        timestamp_to_proto(before_0001),
        Err(TimeError::TimestampOutOfRange)
    );

    let pt = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
    assert_eq!(
        timestamp_from_proto(&pt(0, -1)),
        Err(TimeError::InvalidNanos { nanos: -1 })
    );
    assert_eq!(
        timestamp_from_proto(&pt(0, 1_000_000_000)),
        Err(TimeError::InvalidNanos {
            nanos: 1_000_000_000
        })
    );
    assert_eq!(
        timestamp_from_proto(&pt(MAX_TIMESTAMP_SECONDS + 1, 0)),
        Err(TimeError::TimestampOutOfRange)
    );
    assert_eq!(
        timestamp_from_proto(&pt(MIN_TIMESTAMP_SECONDS - 1, 0)),
        Err(TimeError::TimestampOutOfRange)
    );
    assert_eq!(
        timestamp_from_proto(&pt(i64::MAX, 0)),
        Err(TimeError::TimestampOutOfRange)
    );
}

#[test]
fn time_errors_become_invalid_argument_naming_the_field() {
    let status = TimeError::NegativeDuration {
        seconds: -3,
        nanos: 0,
    }
    .into_status("max_drain_duration");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("`max_drain_duration`"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("negative"),
        "{}",
        status.message()
    );
}

proptest! {
    #[test]
    fn any_valid_duration_round_trips(secs in 0..=MAX_DURATION_SECONDS as u64, nanos in 0..1_000_000_000u32) {
        let d = Duration::new(secs, nanos);
        prop_assert_eq!(duration_from_proto(&duration_to_proto(d).expect("in range")), Ok(d));
    }

    #[test]
    fn any_valid_timestamp_round_trips(
        seconds in MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS,
        nanos in 0..1_000_000_000i32,
    ) {
        let proto = prost_types::Timestamp { seconds, nanos };
        let t = timestamp_from_proto(&proto).expect("in range");
        prop_assert_eq!(timestamp_to_proto(t), Ok(proto));
    }

    #[test]
    fn malformed_durations_never_panic(seconds in any::<i64>(), nanos in any::<i32>()) {
        let proto = prost_types::Duration { seconds, nanos };
        if let Ok(d) = duration_from_proto(&proto) {
            prop_assert_eq!(duration_to_proto(d), Ok(proto));
        }
    }

    #[test]
    fn malformed_timestamps_never_panic(seconds in any::<i64>(), nanos in any::<i32>()) {
        let proto = prost_types::Timestamp { seconds, nanos };
        if let Ok(t) = timestamp_from_proto(&proto) {
            prop_assert_eq!(timestamp_to_proto(t), Ok(proto));
        }
    }
}

// ---------------------------------------------------------------------------
// Leader hint
// ---------------------------------------------------------------------------

#[test]
fn leader_hint_round_trips_through_a_status() {
    let hint = lb::v1::LeaderHint {
        node_id: 3,
        address: "198.18.0.3:7443".into(),
    };
    let status = leader_hint::not_leader(Some(&hint));
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(leader_hint::from_status(&status), Some(hint.clone()));
    assert_eq!(
        status
            .metadata()
            .get(LEADER_ID_KEY)
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );

    // Through the wire form: tonic turns a Status into HTTP headers and back.
    let response = status.into_http::<()>();
    let back = tonic::Status::from_header_map(response.headers()).expect("a status");
    assert_eq!(leader_hint::from_status(&back), Some(hint));

    // IPv6 addresses survive as they are.
    let mut status = tonic::Status::unavailable("x");
    let v6 = lb::v1::LeaderHint {
        node_id: 7,
        address: "[2001:db8::7]:7443".into(),
    };
    leader_hint::attach(&mut status, &v6);
    assert_eq!(leader_hint::from_status(&status), Some(v6));
}

#[test]
fn leader_hint_absent_or_malformed() {
    let status = leader_hint::not_leader(None);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(leader_hint::from_status(&status), None);

    let mut status = tonic::Status::failed_precondition("x");
    status
        .metadata_mut()
        .insert(LEADER_ID_KEY, "zero".parse().expect("ascii"));
    assert_eq!(leader_hint::from_status(&status), None);
    status
        .metadata_mut()
        .insert(LEADER_ID_KEY, "0".parse().expect("ascii"));
    assert_eq!(leader_hint::from_status(&status), None);

    // A non-ASCII address is left out; the id still gets through.
    let mut status = tonic::Status::failed_precondition("x");
    let odd = lb::v1::LeaderHint {
        node_id: 2,
        address: "nœud-2:7443".into(),
    };
    leader_hint::attach(&mut status, &odd);
    assert_eq!(
        leader_hint::from_status(&status),
        Some(lb::v1::LeaderHint {
            node_id: 2,
            address: String::new()
        })
    );
    assert!(status.metadata().get(LEADER_ADDR_KEY).is_none());

    // Attaching again replaces the earlier hint rather than adding to it.
    let mut status = leader_hint::not_leader(Some(&lb::v1::LeaderHint {
        node_id: 1,
        address: "a:1".into(),
    }));
    leader_hint::attach(&mut status, &odd);
    assert!(status.metadata().get(LEADER_ADDR_KEY).is_none());
    assert_eq!(status.metadata().get_all(LEADER_ID_KEY).iter().count(), 1);
}

// ---------------------------------------------------------------------------
// Message round trips, one representative per package
// ---------------------------------------------------------------------------

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    let bytes = message.encode_to_vec();
    assert_eq!(&M::decode(bytes.as_slice()).expect("decodes"), message);
}

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

/// A bgp-mode status with one established peer and its BFD session.
fn bgp_status() -> lb::v1::BgpStatus {
    use lb::v1::*;
    BgpStatus {
        peers: vec![BgpPeer {
            address: "198.18.0.254:179".into(),
            asn: 65000,
            state: BgpSessionState::Established as i32,
            announced: vec!["198.18.0.100/32".into()],
            last_error: String::new(),
            established_since: ts(1_700_000_000),
            bfd: Some(BfdSession {
                state: BfdState::Up as i32,
                remote_state: BfdState::Up as i32,
                last_change_at: ts(1_700_000_000),
                last_change_from: BfdState::Init as i32,
                last_change_diag: "no diagnostic".into(),
                downs: 1,
                detection_time: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 300_000_000,
                }),
                error: String::new(),
            }),
        }],
        last_announce: Some(BgpEvent {
            at: ts(1_700_000_000),
            reason: "leader of term 7 with a fresh quorum lease".into(),
        }),
        last_withdraw: None,
    }
}

#[test]
fn lb_status_round_trips() {
    use lb::v1::*;
    let node = |id: u64, zone: &str| NodeInfo {
        id,
        name: format!("cp-{id}"),
        raft_address: format!("198.18.0.{id}:7400"),
        api_address: format!("198.18.0.{id}:7443"),
        proxy_address: "127.0.0.1:7445".into(),
        zone: zone.into(),
    };
    let message = GetStatusResponse {
        node: Some(node(1, "a")),
        role: NodeRole::Leader as i32,
        leader: Some(node(1, "a")),
        current_term: 7,
        commit_index: 120,
        applied_index: 120,
        members: vec![Member {
            node: Some(node(2, "b")),
            role: MemberRole::Voter as i32,
            replication: Some(ReplicationStatus {
                matched_index: Some(0),
                lag_entries: 120,
                last_ack_age: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 40_000_000,
                }),
            }),
            fence_timers: Some(FenceTimers {
                hold: duration_to_proto(Duration::from_micros(186_617)).ok(),
                election_timeout_max: duration_to_proto(Duration::from_millis(220)).ok(),
            }),
        }],
        vip: Some(VipStatus {
            address: "198.18.0.100".into(),
            mode: VipMode::L2 as i32,
            interface: "eth0".into(),
            holder_node_id: Some(1),
            held_since: ts(1_700_000_000),
            lease_remaining: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            bgp: Some(bgp_status()),
            claim_delay: duration_to_proto(Duration::from_micros(223_533)).ok(),
        }),
        recent_failovers: vec![Failover {
            at: ts(1_700_000_000),
            from_node_id: None,
            to_node_id: 1,
            term: 7,
            cause: FailoverCause::LeaderLost as i32,
            time_to_detect: Some(prost_types::Duration {
                seconds: 0,
                nanos: 310_000_000,
            }),
            time_to_move_vip: Some(prost_types::Duration {
                seconds: 0,
                nanos: 20_000_000,
            }),
        }],
        fail_open: false,
        zones_down: vec!["c".into()],
        ..Default::default()
    };
    round_trip(&message);
    // Explicit presence: a matched index of 0 is not the same as none.
    let decoded = GetStatusResponse::decode(message.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(
        decoded.members[0]
            .replication
            .as_ref()
            .and_then(|r| r.matched_index),
        Some(0)
    );

    round_trip(&ProbeReport {
        prober: Some(ProberIdentity {
            node_name: "cp-2".into(),
            zone: "b".into(),
            instance_id: "5f0c".into(),
        }),
        sequence: 42,
        kind: ReportKind::Changes as i32,
        observations: vec![Observation {
            target_id: "cp-1".into(),
            target_address: "198.18.0.1:6443".into(),
            kind: ProbeKind::Readyz as i32,
            ok: false,
            reason: ProbeReason::HttpStatus as i32,
            detail: "[-]shutdown failed".into(),
            http_status: Some(500),
            latency: Some(prost_types::Duration {
                seconds: 0,
                nanos: 2_000_000,
            }),
            observed_at: ts(1_700_000_001),
        }],
        sent_at: ts(1_700_000_001),
    });
}

#[test]
fn backup_restore_progress_round_trips() {
    use backup::v1::*;
    round_trip(&RestoreProgress {
        restore_id: "r-20250102".into(),
        at: ts(1_735_786_000),
        event: Some(restore_progress::Event::Node(NodeRestoreProgress {
            restore_id: "r-20250102".into(),
            node_name: "cp-1".into(),
            step: NodeStep::MoveDataDirAside as i32,
            status: StepStatus::Done as i32,
            detail: String::new(),
            path: "/var/lib/etcd.bulwark-restore-r-20250102".into(),
            transfer: None,
            at: ts(1_735_786_001),
        })),
    });
    round_trip(&RestoreRequest {
        snapshot: Some(SnapshotSelector {
            selector: Some(snapshot_selector::Selector::Latest(true)),
        }),
        target: Some(RestoreTarget {
            target: Some(restore_target::Target::Revision(123_456)),
        }),
        dry_run: true,
        confirm: false,
        bump_revision: Some(0),
        ..Default::default()
    });
}

#[test]
fn raft_append_entries_round_trips() {
    use raft::v1::*;
    let log_id = |index| {
        Some(LogId {
            term: 3,
            node_id: 1,
            index,
        })
    };
    let vote = Some(Vote {
        leader_id: Some(LeaderId {
            term: 3,
            node_id: 1,
        }),
        committed: true,
    });
    let membership = Membership {
        configs: vec![NodeIdSet {
            node_ids: vec![1, 2, 3],
        }],
        nodes: HashMap::from([(
            1,
            Node {
                name: "cp-1".into(),
                raft_address: "198.18.0.1:7400".into(),
                api_address: "198.18.0.1:7443".into(),
                proxy_address: String::new(),
                zone: "a".into(),
            },
        )]),
    };
    round_trip(&AppendEntriesRequest {
        vote,
        prev_log_id: log_id(9),
        entries: vec![
            Entry {
                log_id: log_id(10),
                payload: Some(entry::Payload::Blank(())),
            },
            Entry {
                log_id: log_id(11),
                payload: Some(entry::Payload::Membership(membership)),
            },
            Entry {
                log_id: log_id(12),
                payload: Some(entry::Payload::Normal(Command {
                    proposed_at: ts(1_700_000_000),
                    command: Some(command::Command::SetAdminState(SetAdminState {
                        id: "cp-2".into(),
                        admin_state: AdminState::Drain as i32,
                        drain_deadline: ts(1_700_000_600),
                    })),
                })),
            },
        ],
        leader_commit: log_id(9),
    });
    round_trip(&AppendEntriesResponse {
        result: Some(append_entries_response::Result::Conflict(AppendConflict {})),
    });
}

// ---------------------------------------------------------------------------
// Documentation
// ---------------------------------------------------------------------------

/// Every service, rpc, message, field, oneof, enum and enum value in our
/// protos has a leading comment: the protos are the API's documentation, and
/// later changes must keep it that way.
#[test]
fn every_proto_element_is_commented() {
    use prost_types::DescriptorProto;

    fn message(
        path: &mut Vec<i32>,
        name: &str,
        m: &DescriptorProto,
        out: &mut Vec<(Vec<i32>, String)>,
    ) {
        out.push((path.clone(), name.to_owned()));
        for (i, field) in m.field.iter().enumerate() {
            out.push((
                [path.as_slice(), &[2, i as i32]].concat(),
                format!("{name}.{}", field.name()),
            ));
        }
        for (i, oneof) in m.oneof_decl.iter().enumerate() {
            // proto3 `optional` fields get a synthetic oneof of their own.
            let synthetic = m
                .field
                .iter()
                .any(|f| f.proto3_optional() && f.oneof_index == Some(i as i32));
            if !synthetic {
                out.push((
                    [path.as_slice(), &[8, i as i32]].concat(),
                    format!("{name}.{}", oneof.name()),
                ));
            }
        }
        for (i, nested) in m.nested_type.iter().enumerate() {
            if nested.options.as_ref().is_some_and(|o| o.map_entry()) {
                continue; // synthesized for map fields
            }
            path.extend([3, i as i32]);
            message(path, &format!("{name}.{}", nested.name()), nested, out);
            path.truncate(path.len() - 2);
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            let p = [path.as_slice(), &[4, i as i32]].concat();
            enumeration(&p, &format!("{name}.{}", e.name()), e, out);
        }
    }

    fn enumeration(
        path: &[i32],
        name: &str,
        e: &prost_types::EnumDescriptorProto,
        out: &mut Vec<(Vec<i32>, String)>,
    ) {
        out.push((path.to_vec(), name.to_owned()));
        for (i, v) in e.value.iter().enumerate() {
            out.push((
                [path, &[2, i as i32]].concat(),
                format!("{name}.{}", v.name()),
            ));
        }
    }

    let mut undocumented = Vec::new();
    for file in descriptor_set()
        .file
        .iter()
        .filter(|f| f.package().starts_with("bulwark."))
    {
        let commented: BTreeSet<Vec<i32>> = file
            .source_code_info
            .as_ref()
            .expect("source info kept")
            .location
            .iter()
            .filter(|l| !l.leading_comments().trim().is_empty())
            .map(|l| l.path.clone())
            .collect();
        let mut elements = Vec::new();
        for (i, m) in file.message_type.iter().enumerate() {
            message(&mut vec![4, i as i32], m.name(), m, &mut elements);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            enumeration(&[5, i as i32], e.name(), e, &mut elements);
        }
        for (i, s) in file.service.iter().enumerate() {
            elements.push((vec![6, i as i32], s.name().to_owned()));
            for (j, m) in s.method.iter().enumerate() {
                elements.push((
                    vec![6, i as i32, 2, j as i32],
                    format!("{}.{}", s.name(), m.name()),
                ));
            }
        }
        for (i, ext) in file.extension.iter().enumerate() {
            elements.push((vec![7, i as i32], ext.name().to_owned()));
        }
        undocumented.extend(
            elements
                .into_iter()
                .filter(|(path, _)| !commented.contains(path))
                .map(|(_, name)| format!("{}: {name}", file.name())),
        );
    }
    assert!(
        undocumented.is_empty(),
        "uncommented proto elements:\n{}",
        undocumented.join("\n")
    );
}
