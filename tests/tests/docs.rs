//! docs/SECURITY.md lists the access level of every rpc; this keeps that
//! table equal to the `(bulwark.auth.v1.access)` options in `proto/`, so an
//! rpc added or re-levelled without the docs fails here with the row to
//! write.

// Test code: a failed expectation panics with the file in the message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use bulwark_testkit::tools::workspace_root;

/// `package.Service/Rpc` -> level (`read`, `operator`, `prober`, `peer`)
/// from every `.proto` under `dir`.
fn proto_access(dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            proto_access(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "proto") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut package = String::new();
        let mut service = String::new();
        let mut rpc = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(p) = line.strip_prefix("package ") {
                package = p.trim_end_matches(';').to_owned();
            } else if let Some(s) = line.strip_prefix("service ") {
                service = s.split_whitespace().next().unwrap().to_owned();
            } else if let Some(r) = line.strip_prefix("rpc ") {
                rpc = r.split('(').next().unwrap().trim().to_owned();
            } else if let Some((_, level)) = line.split_once("(bulwark.auth.v1.access) = ACCESS_") {
                let level = level.trim_end_matches(';').to_lowercase();
                out.insert(format!("{package}.{service}/{rpc}"), level);
            }
        }
    }
}

#[test]
fn security_md_lists_every_rpc_with_its_access_level() {
    let root = workspace_root();
    let mut protos = BTreeMap::new();
    proto_access(&root.join("proto"), &mut protos);
    assert!(
        protos.len() > 20,
        "found only {} rpcs in proto/: is the parser broken?",
        protos.len()
    );
    let doc = std::fs::read_to_string(root.join("docs/SECURITY.md")).unwrap();
    let mut documented = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 3
            && let Some(rpc) = cells[1]
                .strip_prefix("`bulwark.")
                .and_then(|r| r.strip_suffix('`'))
            && rpc.contains('/')
        {
            documented.insert(format!("bulwark.{rpc}"), cells[2].to_owned());
        }
    }
    let missing: Vec<String> = protos
        .iter()
        .filter(|(rpc, level)| documented.get(*rpc) != Some(level))
        .map(|(rpc, level)| format!("| `{rpc}` | {level} | … |"))
        .collect();
    let stale: Vec<&String> = documented
        .keys()
        .filter(|rpc| !protos.contains_key(*rpc))
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/SECURITY.md's rpc table differs from proto/.\nrows to add or fix:\n{}\nrows for rpcs that no longer exist: {stale:?}",
        missing.join("\n")
    );
}
