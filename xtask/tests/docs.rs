//! docs/ARCHITECTURE.md cannot drift from the tree: every source file under
//! `components/*/src` is named by one of its tables, every path a table
//! names exists, and every caller its gRPC table names calls the service.
//!
//! The tables are read generically: a table row's first cell names paths in
//! backticks (`src/node.rs`, `snapshot.rs`, `components/prober/src/lib.rs`,
//! or a folder such as `src/proxy/` or `restore/`, which covers every file
//! below it). A path that does not start with `components/` is relative to
//! the last `` `components/<crate>` `` the document mentioned before the
//! table: `src/…` and `tests/…` to the crate's folder, anything else to its
//! `src/`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}

fn architecture() -> String {
    fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("reading docs/ARCHITECTURE.md")
}

/// The texts between backticks in `s`.
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// A table row's cells (`\|` is a pipe inside a cell).
fn cells(line: &str) -> Vec<String> {
    line.replace("\\|", "\u{0}")
        .trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.replace('\u{0}', "|").trim().to_owned())
        .collect()
}

fn is_table_row(line: &str) -> bool {
    line.trim_start().starts_with('|')
}

/// A table entry, resolved to a path from the workspace root.
#[derive(Debug)]
struct Entry {
    path: String,
    line: usize,
}

/// The paths the tables' first cells name.
fn table_entries(doc: &str) -> Vec<Entry> {
    let mut base: Option<String> = None;
    let mut entries = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        if !is_table_row(line) {
            // Prose and headings set the crate the next table is about.
            for word in backticked(line) {
                let mut parts = word.trim_end_matches('/').split('/');
                if let (Some("components"), Some(krate), None) =
                    (parts.next(), parts.next(), parts.next())
                {
                    base = Some(format!("components/{krate}"));
                }
            }
            continue;
        }
        let Some(first) = cells(line).into_iter().next() else {
            continue;
        };
        for word in backticked(&first) {
            if !(word.ends_with(".rs") || word.ends_with('/')) {
                continue; // a package, a service, a function: not a path
            }
            let path = if word.starts_with("components/") {
                word.to_owned()
            } else {
                let base = base.as_deref().unwrap_or_else(|| {
                    panic!(
                        "ARCHITECTURE.md:{}: `{word}` is relative, but no `components/<crate>` precedes its table",
                        i + 1
                    )
                });
                if word.starts_with("src/") || word.starts_with("tests/") {
                    format!("{base}/{word}")
                } else {
                    format!("{base}/src/{word}")
                }
            };
            entries.push(Entry { path, line: i + 1 });
        }
    }
    entries
}

/// Every file below `dir`, as paths from the workspace root.
fn files_below(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for entry in read.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_below(root, &path, out);
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.insert(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// The source files of every component.
fn component_sources(root: &Path) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    for krate in fs::read_dir(root.join("components"))
        .expect("components/")
        .flatten()
    {
        files_below(root, &krate.path().join("src"), &mut files);
    }
    files.retain(|f| f.ends_with(".rs"));
    files
}

/// `pattern` with at most one `*` (any run of characters).
fn matches(pattern: &str, path: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == path,
        Some((head, tail)) => {
            path.len() >= head.len() + tail.len() && path.starts_with(head) && path.ends_with(tail)
        }
    }
}

fn covers(entry: &str, file: &str) -> bool {
    if entry.ends_with('/') {
        file.starts_with(entry)
    } else {
        matches(entry, file)
    }
}

#[test]
fn every_component_source_file_is_in_a_table() {
    let root = root();
    let entries = table_entries(&architecture());
    let missing: Vec<String> = component_sources(&root)
        .into_iter()
        .filter(|f| !entries.iter().any(|e| covers(&e.path, f)))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md's tables do not name these files (add a row, or name their folder with a trailing /): {missing:#?}"
    );
}

#[test]
fn every_path_a_table_names_exists() {
    let root = root();
    let mut all = BTreeSet::new();
    files_below(&root, &root.join("components"), &mut all);
    let stale: Vec<String> = table_entries(&architecture())
        .into_iter()
        .filter(|e| {
            if e.path.ends_with('/') {
                !root.join(&e.path).is_dir()
            } else {
                !all.iter().any(|f| matches(&e.path, f))
            }
        })
        .map(|e| format!("ARCHITECTURE.md:{}: {}", e.line, e.path))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/ARCHITECTURE.md names paths that do not exist: {stale:#?}"
    );
}

/// The binary (or, without one, the package) each component builds, with
/// its folder.
fn binaries(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for krate in fs::read_dir(root.join("components"))
        .expect("components/")
        .flatten()
    {
        let Ok(manifest) = fs::read_to_string(krate.path().join("Cargo.toml")) else {
            continue;
        };
        // The first `name = "…"` is the package's; one after `[[bin]]` is
        // the binary's.
        let mut package = None;
        let mut binary = None;
        let mut in_bin = false;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if let Some(v) = line.strip_prefix("name = ") {
                let v = v.trim_matches('"').to_owned();
                if in_bin {
                    binary.get_or_insert(v);
                } else {
                    package.get_or_insert(v);
                }
            }
        }
        if let Some(name) = binary.or(package) {
            out.push((name, krate.path()));
        }
    }
    out
}

/// Whether any source file below `dir` mentions `word` as a whole word.
fn mentions(dir: &Path, word: &str) -> bool {
    let root = root();
    let mut files = BTreeSet::new();
    files_below(&root, dir, &mut files);
    files.iter().filter(|f| f.ends_with(".rs")).any(|f| {
        let text = fs::read_to_string(root.join(f)).unwrap_or_default();
        text.match_indices(word).any(|(at, _)| {
            let before = text[..at].chars().next_back();
            let after = text[at + word.len()..].chars().next();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

#[test]
fn every_grpc_caller_calls_the_service() {
    let root = root();
    let doc = architecture();
    let binaries = binaries(&root);
    let rows: Vec<Vec<String>> = doc
        .lines()
        .skip_while(|l| !(is_table_row(l) && cells(l).get(2).is_some_and(|c| c == "callers")))
        .skip(2) // the header and its rule
        .take_while(|l| is_table_row(l))
        .map(cells)
        .collect();
    assert!(
        rows.len() >= 6,
        "the gRPC table (| package | service | callers | notes |) was not found"
    );
    let mut wrong = Vec::new();
    for row in &rows {
        let service = backticked(&row[1])
            .first()
            .map(|s| (*s).to_owned())
            .unwrap_or_else(|| panic!("no service in backticks in {row:?}"));
        let client = format!("{service}Client");
        let callers = backticked(&row[2]);
        for caller in &callers {
            match binaries.iter().find(|(name, _)| name == caller) {
                None => wrong.push(format!(
                    "{service}: `{caller}` is not a binary of components/"
                )),
                Some((_, dir)) if !mentions(&dir.join("src"), &client) => wrong.push(format!(
                    "{service}: `{caller}` ({}) never uses {client}",
                    dir.display()
                )),
                Some(_) => {}
            }
        }
        if callers.is_empty() {
            // The table says nobody in the tree calls it: hold it to that.
            for (name, dir) in &binaries {
                if mentions(&dir.join("src"), &client) {
                    wrong.push(format!(
                        "{service}: the table names no caller, but `{name}` uses {client}"
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/ARCHITECTURE.md's gRPC table is wrong: {wrong:#?}"
    );
}

#[test]
fn relative_entries_resolve_against_the_crate_before_the_table() {
    let doc = "## x (`components/lb`)\n\n| file | owns |\n|---|---|\n| `src/node.rs` / `src/api/` | a |\n\n`components/backup` text\n\n| `restore/` / `engine.rs` | b |\n| `components/prober/src/lib.rs` | c |\n";
    let paths: Vec<String> = table_entries(doc).into_iter().map(|e| e.path).collect();
    assert_eq!(
        paths,
        [
            "components/lb/src/node.rs",
            "components/lb/src/api/",
            "components/backup/src/restore/",
            "components/backup/src/engine.rs",
            "components/prober/src/lib.rs",
        ]
    );
    assert!(covers(
        "components/backup/src/restore/",
        "components/backup/src/restore/agent/disk.rs"
    ));
    assert!(!covers(
        "components/backup/src/restore/",
        "components/backup/src/restorer.rs"
    ));
    assert!(covers(
        "components/lb/tests/proxy_*.rs",
        "components/lb/tests/proxy_drain.rs"
    ));
}
