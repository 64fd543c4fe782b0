//! bulwark-lb's request handling without a cluster: arbitrary bytes decoded
//! as each operator request message and run through the API's field
//! validation, and as a sequence of replicated Raft commands applied to the
//! state machine (a command that does not make sense is refused, never a
//! panic, and the state still converts to what the proxies read).

#![no_main]

use bulwark_api::lb::v1 as lb;
use bulwark_api::raft::v1 as pb;
use bulwark_lb::api::{self, check_address, check_id, check_weight, check_zone};
use bulwark_lb::config::{valid_backend_id, valid_host_port};
use bulwark_lb::raft::state::LbState;
use bulwark_lb::raft::types::{Cmd, Entry, LeaderId, LogId};
use libfuzzer_sys::fuzz_target;
use openraft::entry::EntryPayload;
use openraft::vote::RaftLeaderId;
use prost::Message;

fn duration(d: Option<&prost_types::Duration>) {
    if let Some(d) = d {
        let _ = bulwark_api::time::duration_from_proto(d);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(r) = lb::AddBackendRequest::decode(rest) {
                let _ = check_id(&r.id);
                let _ = check_address(&r.address);
                let _ = check_weight(r.weight.unwrap_or(100));
                let _ = check_zone(&r.zone);
            }
        }
        1 => {
            if let Ok(r) = lb::UpdateBackendRequest::decode(rest) {
                let _ = check_id(&r.id);
                if let Some(w) = r.weight {
                    let _ = check_weight(w);
                }
                if let Some(z) = &r.zone {
                    let _ = check_zone(z);
                }
            }
        }
        2 => {
            if let Ok(r) = lb::DrainBackendRequest::decode(rest) {
                let _ = check_id(&r.id);
                duration(r.max_drain_duration.as_ref());
            }
        }
        3 => {
            if let Ok(r) = lb::AddMemberRequest::decode(rest) {
                if let Some(n) = &r.node {
                    let _ = valid_host_port(&n.raft_address);
                    let _ = valid_host_port(&n.api_address);
                    let _ = valid_host_port(&n.proxy_address);
                }
                duration(r.catch_up_timeout.as_ref());
            }
        }
        4 => {
            if let Ok(r) = lb::RemoveBackendRequest::decode(rest) {
                let _ = check_id(&r.id);
                let _ = valid_backend_id(&r.id);
            }
        }
        _ => {
            // A sequence of commands: each prefixed by its length (1 byte).
            let mut state = LbState::default();
            let mut rest = rest;
            let mut index = 1;
            while let Some((&len, tail)) = rest.split_first() {
                let (msg, tail) = tail.split_at(usize::from(len).min(tail.len()));
                rest = tail;
                let Ok(cmd) = pb::Command::decode(msg) else {
                    continue;
                };
                let entry = Entry {
                    log_id: LogId::new(LeaderId::new(1, 1), index),
                    payload: EntryPayload::Normal(Cmd(cmd)),
                };
                let _ = state.apply(&entry);
                index += 1;
            }
            let _ = api::backend_set(&state);
        }
    }
});
