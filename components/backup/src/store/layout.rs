//! Where things live in the object store, and snapshot ids.
//!
//! ```text
//! <url prefix>/<clusterName>/
//!   full/<id>/snapshot.db.zst[.age]      the snapshot: zstd, then age when encrypted
//!   full/<id>/manifest.json              written last: the commit point
//!   full/<id>/verify/<time>.json         one record per verification or drill
//!   delta/<base id>/…                    continuous deltas (delta/segments.rs)
//!   restore/<restore id>/target.db       a point-in-time restore's target while its members fetch it
//!   restores/<restore id>.json           what a finished restore left (restore/record.rs)
//!   clusters/<etcd cluster id>.json      each etcd cluster backups have seen (snapshot/clusters.rs)
//! ```
//!
//! `<id>` is `<yyyymmddThhmmssZ>-r<revision>-<4 hex>`: it sorts by time,
//! names the revision for humans, and the random suffix keeps two snapshots
//! taken in the same second apart. The cluster's directory is a configured
//! name rather than etcd's cluster id because a restore creates a new etcd
//! cluster id: history before and after a restore must stay in one place so
//! retention and restores see all of it. The manifest records the etcd
//! cluster id.

use chrono::{DateTime, NaiveDateTime, Utc};
use object_store::path::Path;

/// File name of the manifest.
pub const MANIFEST: &str = "manifest.json";
/// Directory of verification records inside a snapshot's directory.
pub const VERIFY_DIR: &str = "verify";
/// Directory of full snapshots under the cluster's directory.
pub const FULL_DIR: &str = "full";
/// Directory of delta segments.
pub const DELTA_DIR: &str = "delta";
/// Directory of restore targets (deleted when their restore ends; garbage
/// collection removes what a crash left).
pub const RESTORE_DIR: &str = "restore";

/// Directory of the records of the etcd clusters backups have seen (never
/// deleted: they number the timelines).
pub const CLUSTERS_DIR: &str = "clusters";

const TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// Formats `t` as the time part of ids and record names.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.format(TIME_FORMAT).to_string()
}

/// Parses the time part of an id or record name.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(s, TIME_FORMAT)
        .ok()
        .map(|n| n.and_utc())
}

/// A new snapshot id for a snapshot started at `at` from `revision`.
pub fn new_snapshot_id(at: DateTime<Utc>, revision: i64) -> String {
    format!("{}-r{revision}-{}", format_time(at), random_suffix())
}

/// Four random hex digits, which keep two ids taken in the same second
/// apart (snapshot and restore ids).
pub fn random_suffix() -> String {
    let mut suffix = [0u8; 2];
    // A failing system RNG only makes the suffix less random; the time and
    // revision still make ids unique in practice.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix);
    suffix.iter().map(|b| format!("{b:02x}")).collect()
}

/// The time a snapshot id was taken at, if `id` is one of ours.
pub fn id_time(id: &str) -> Option<DateTime<Utc>> {
    let (time, rest) = id.split_once('-')?;
    rest.strip_prefix('r')?;
    parse_time(time)
}

/// Whether `id` is safe to use as one path segment (callers pass ids from
/// requests; a `/` or `..` must not escape the snapshot's directory).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What an object under `full/` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `full/<id>/manifest.json`
    Manifest {
        /// Snapshot id.
        id: String,
    },
    /// `full/<id>/snapshot.db…`
    Data {
        /// Snapshot id.
        id: String,
    },
    /// `full/<id>/verify/<time>.json`
    Verification {
        /// Snapshot id.
        id: String,
        /// Record name without `.json`.
        name: String,
    },
    /// Anything else inside `full/<id>/` (kept with the snapshot, removed
    /// with it).
    Other {
        /// Snapshot id.
        id: String,
    },
}

impl Entry {
    /// The snapshot the entry belongs to.
    pub fn id(&self) -> &str {
        match self {
            Entry::Manifest { id }
            | Entry::Data { id }
            | Entry::Verification { id, .. }
            | Entry::Other { id } => id,
        }
    }
}

/// The paths of one cluster's backups inside the store.
#[derive(Clone, Debug)]
pub struct Layout {
    root: Path,
}

impl Layout {
    /// The layout under `prefix` (the URL's path) for `cluster_name`.
    pub fn new(prefix: &Path, cluster_name: &str) -> Self {
        Self {
            root: prefix.clone().join(cluster_name),
        }
    }

    /// `<prefix>/<cluster>`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/full`.
    pub fn full_dir(&self) -> Path {
        self.root.clone().join(FULL_DIR)
    }

    /// `<root>/delta`, reserved for delta segments.
    pub fn delta_dir(&self) -> Path {
        self.root.clone().join(DELTA_DIR)
    }

    /// `<root>/full/<id>`.
    pub fn snapshot_dir(&self, id: &str) -> Path {
        self.full_dir().join(id)
    }

    /// The manifest of snapshot `id`.
    pub fn manifest(&self, id: &str) -> Path {
        self.snapshot_dir(id).join(MANIFEST)
    }

    /// The snapshot object of `id`: `snapshot.db`, plus `.zst` when
    /// compressed and `.age` when encrypted, so the name says how to read it.
    pub fn data(&self, id: &str, compressed: bool, encrypted: bool) -> Path {
        let mut name = String::from("snapshot.db");
        if compressed {
            name.push_str(".zst");
        }
        if encrypted {
            name.push_str(".age");
        }
        self.snapshot_dir(id).join(name)
    }

    /// A verification record of `id`, named by its time.
    pub fn verification(&self, id: &str, at: DateTime<Utc>) -> Path {
        self.snapshot_dir(id)
            .join(VERIFY_DIR)
            .join(format!("{}.json", format_time(at)))
    }

    /// `<root>/clusters`.
    pub fn clusters_dir(&self) -> Path {
        self.root.clone().join(CLUSTERS_DIR)
    }

    /// The record of etcd cluster `cluster_id`: `clusters/<16 hex>.json`,
    /// the id as manifests write it.
    pub fn cluster_record(&self, cluster_id: u64) -> Path {
        self.clusters_dir().join(format!("{cluster_id:016x}.json"))
    }

    /// A path relative to the store location (what manifests record).
    pub fn relative(&self, prefix: &Path, path: &Path) -> String {
        match path.prefix_match(prefix) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_owned())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.to_string(),
        }
    }

    /// Classifies an object found under [`Layout::full_dir`].
    pub fn classify(&self, path: &Path) -> Option<Entry> {
        let parts: Vec<String> = path
            .prefix_match(&self.full_dir())?
            .map(|p| p.as_ref().to_owned())
            .collect();
        let id = parts.first()?.clone();
        if !is_valid_id(&id) {
            return None;
        }
        Some(match parts.as_slice() {
            [_, name] if name == MANIFEST => Entry::Manifest { id },
            [_, name] if name.starts_with("snapshot.db") => Entry::Data { id },
            [_, dir, file] if dir == VERIFY_DIR && file.ends_with(".json") => Entry::Verification {
                id,
                name: file.trim_end_matches(".json").to_owned(),
            },
            _ => Entry::Other { id },
        })
    }
}

/// Object path of a manifest's snapshot object (as the catalog stores it).
pub fn object_path(prefix: &Path, object_key: &str) -> Path {
    object_key
        .split('/')
        .fold(prefix.clone(), |p, part| p.join(part))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn ids_sort_by_time_and_parse_back() {
        let t = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap();
        let id = new_snapshot_id(t, 42);
        assert!(id.starts_with("20250102T030405Z-r42-"), "{id}");
        assert_eq!(id_time(&id), Some(t));
        assert!(is_valid_id(&id));
        let later = new_snapshot_id(t + chrono::Duration::seconds(1), 7);
        assert!(later > id);
        assert!(!is_valid_id("../x"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(""));
    }

    #[test]
    fn paths_and_classification() {
        let l = Layout::new(&Path::from("backups/etcd"), "prod");
        let t = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap();
        let id = "20250102T030405Z-r42-abcd";
        assert_eq!(
            l.manifest(id).as_ref(),
            "backups/etcd/prod/full/20250102T030405Z-r42-abcd/manifest.json"
        );
        assert_eq!(
            l.data(id, true, true).as_ref(),
            "backups/etcd/prod/full/20250102T030405Z-r42-abcd/snapshot.db.zst.age"
        );
        assert_eq!(
            l.classify(&l.manifest(id)),
            Some(Entry::Manifest { id: id.into() })
        );
        assert_eq!(
            l.classify(&l.data(id, true, false)),
            Some(Entry::Data { id: id.into() })
        );
        assert_eq!(
            l.classify(&l.verification(id, t)),
            Some(Entry::Verification {
                id: id.into(),
                name: "20250102T030405Z".into()
            })
        );
        assert_eq!(l.classify(&Path::from("backups/etcd/prod/delta/x")), None);
        assert_eq!(
            l.cluster_record(0xab).as_ref(),
            "backups/etcd/prod/clusters/00000000000000ab.json"
        );
        assert_eq!(l.classify(&l.cluster_record(0xab)), None);
        assert_eq!(
            l.relative(&Path::from("backups/etcd"), &l.data(id, true, false)),
            "prod/full/20250102T030405Z-r42-abcd/snapshot.db.zst"
        );
    }
}
