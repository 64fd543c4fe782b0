//! bulwark-backup's request handling without a daemon: arbitrary bytes
//! decoded as each Backup request message, and the fields the handlers
//! check (snapshot ids and selectors, timestamps, durations) run through
//! the same public parsers; plus the parsers of operator-typed values in
//! requests and config (store URLs, byte sizes).

#![no_main]

use std::collections::BTreeMap;

use bulwark_api::backup::v1 as pb;
use bulwark_backup::config::ByteSize;
use bulwark_backup::store::StoreSpec;
use bulwark_backup::store::layout;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn selector(s: Option<&pb::SnapshotSelector>) {
    if let Some(pb::snapshot_selector::Selector::Id(id)) = s.and_then(|s| s.selector.as_ref()) {
        let _ = layout::is_valid_id(id);
        let _ = layout::id_time(id);
    }
}

fn timestamp(t: Option<&prost_types::Timestamp>) {
    if let Some(t) = t {
        let _ = bulwark_api::time::timestamp_from_proto(t);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => drop(pb::CreateSnapshotRequest::decode(rest)),
        1 => {
            if let Ok(r) = pb::ListSnapshotsRequest::decode(rest) {
                timestamp(r.created_after.as_ref());
                timestamp(r.created_before.as_ref());
            }
        }
        2 => {
            if let Ok(r) = pb::GetSnapshotRequest::decode(rest) {
                selector(r.snapshot.as_ref());
            }
        }
        3 => {
            if let Ok(r) = pb::DeleteSnapshotRequest::decode(rest) {
                let _ = layout::is_valid_id(&r.id);
            }
        }
        4 => {
            if let Ok(r) = pb::VerifySnapshotRequest::decode(rest) {
                selector(r.snapshot.as_ref());
            }
        }
        5 => {
            if let Ok(r) = pb::RestoreRequest::decode(rest) {
                selector(r.snapshot.as_ref());
                if let Some(d) = &r.node_step_timeout {
                    let _ = bulwark_api::time::duration_from_proto(d);
                }
            }
        }
        6 => drop(pb::ListDeltasRequest::decode(rest)),
        _ => {
            let text = String::from_utf8_lossy(rest);
            let _ = ByteSize::parse(&text);
            let _ = StoreSpec::parse(&text, &BTreeMap::new());
        }
    }
});
