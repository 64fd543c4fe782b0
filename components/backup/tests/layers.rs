//! The crate's modules import only downwards (lib.rs states the order):
//! reads every production source file, collects its `crate::<module>`
//! references (comments and `#[cfg(test)]` modules left out) and fails on
//! any reference to a module above the file's own, naming the file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom to top, as lib.rs lists them.
const LAYERS: &[&str] = &[
    "error", "store", "etcd", "pipeline", "engine", "snapshot", "metrics", "delta", "verify",
    "schedule", "config", "restore", "api", "daemon", "lib", "main",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`snapshot/read.rs` → `snapshot`).
fn layer_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("a file under src");
    let first = rel
        .components()
        .next()
        .expect("a path under src")
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Every `crate::x` the production code of `text` names, `use
/// crate::{a, b::c}` groups included.
fn references(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 40, "found only {} source files", files.len());
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut upward = Vec::new();
    for file in &files {
        let own = layer_of(&src, file);
        let own_rank = rank(&own).unwrap_or_else(|| {
            panic!(
                "{}: module `{own}` is not in LAYERS; place it in lib.rs's order and here",
                file.display()
            )
        });
        let text = std::fs::read_to_string(file).unwrap();
        for target in references(&text) {
            // Items at the crate root (re-exports such as `crate::BackupError`).
            let Some(target_rank) = rank(&target) else {
                continue;
            };
            if target_rank > own_rank {
                upward.push(format!(
                    "{} ({own}) uses crate::{target}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a higher layer (lib.rs gives the order):\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reference_scanner_sees_groups_and_paths_and_skips_comments_and_tests() {
    let text = "use crate::snapshot::read;\nuse crate::{delta, restore::pitr::Target};\n\
                // crate::daemon in a comment\nfn f() { crate::metrics::x(); }\n\
                #[cfg(test)]\nmod tests { use crate::api; }\n";
    let found: Vec<String> = references(text).into_iter().collect();
    assert_eq!(found, ["delta", "metrics", "restore", "snapshot"]);
}
