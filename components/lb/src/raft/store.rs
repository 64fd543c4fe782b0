//! Durable Raft storage: log, vote, committed index, state machine and the
//! last snapshot, in one redb file under `dataDir`.
//!
//! Every write is one redb transaction committed with immediate durability
//! (fsync) before openraft is told it happened: a vote is on disk before the
//! node answers the candidate, an entry before it is acknowledged. A node
//! restarted after a crash therefore keeps its vote (it cannot vote twice in
//! a term) and its log (a quorum that counted it still holds the entry).
//!
//! The state machine is small (a registry of apiservers), so it is kept in
//! memory and written whole after each applied batch. Readers (the API, the
//! data-path publisher) follow it through a `watch` channel of immutable
//! [`LbState`] snapshots.
//!
//! redb is synchronous; its calls run on the blocking pool so an fsync does
//! not stall the Raft core's executor thread.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulwark_api::raft::v1 as pb;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::convert::{
    entry_from_pb, entry_to_pb, log_id_from_pb, log_id_to_pb, snapshot_meta_from_pb,
    snapshot_meta_to_pb, stored_membership_from_pb, vote_from_pb, vote_to_pb,
};
use super::state::LbState;
use super::types::{Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, Vote};

/// Log entries by index, each an encoded `bulwark.raft.v1.Entry`.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Single values (protobuf-encoded), by the keys below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";
const KEY_STATE: &str = "state";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";
const KEY_CLUSTER_ID: &str = "cluster_id";

/// The file under `dataDir`.
pub const DB_FILE: &str = "raft.redb";

/// Storage failures when opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data dir could not be created or the file opened.
    #[error("cannot open the Raft store {path}: {detail}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The file holds something we cannot decode.
    #[error("the Raft store {path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

/// The opened redb file, shared by the log store and the state machine.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) `dir/raft.redb`. The directory is created 0700:
    /// the log holds the cluster's registry and membership.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(DB_FILE);
        let open_err = |detail: String| StoreError::Open {
            path: path.clone(),
            detail,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(e.to_string()))?;
        }
        let db = Database::create(&path).map_err(|e| open_err(e.to_string()))?;
        // Create the tables so that readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        {
            txn.open_table(LOG).map_err(|e| open_err(e.to_string()))?;
            txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> io::Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(io_err)?
    }

    fn get_meta(db: &Database, key: &str) -> io::Result<Option<Vec<u8>>> {
        let txn = db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META).map_err(io_err)?;
        Ok(table.get(key).map_err(io_err)?.map(|v| v.value().to_vec()))
    }

    fn put_meta(db: &Database, items: &[(&str, Option<&[u8]>)]) -> io::Result<()> {
        let txn = db.begin_write().map_err(io_err)?;
        {
            let mut table = txn.open_table(META).map_err(io_err)?;
            for (key, value) in items {
                match value {
                    Some(v) => {
                        table.insert(*key, *v).map_err(io_err)?;
                    }
                    None => {
                        table.remove(*key).map_err(io_err)?;
                    }
                }
            }
        }
        txn.commit().map_err(io_err)
    }

    /// The cluster this node belongs to, once it bootstrapped or was
    /// admitted by a leader (see [`super::membership`]). `None` for a node
    /// whose data dir is empty.
    pub async fn cluster_id(&self) -> io::Result<Option<String>> {
        self.blocking(|db| {
            Self::get_meta(db, KEY_CLUSTER_ID)?
                .map(|v| String::from_utf8(v).map_err(|e| corrupt("cluster id", e)))
                .transpose()
        })
        .await
    }

    /// Records the cluster this node belongs to (durably, before it takes
    /// part in Raft).
    pub async fn set_cluster_id(&self, id: &str) -> io::Result<()> {
        let id = id.to_owned();
        self.blocking(move |db| Self::put_meta(db, &[(KEY_CLUSTER_ID, Some(id.as_bytes()))]))
            .await
    }

    /// The log store half.
    pub fn log_store(&self) -> LogStore {
        LogStore {
            store: self.clone(),
        }
    }

    /// The state machine half, loaded from disk.
    pub async fn state_machine(&self) -> Result<StateMachineStore, StoreError> {
        let bytes = self
            .blocking(|db| Self::get_meta(db, KEY_STATE))
            .await
            .map_err(|e| StoreError::Open {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
        let state = match bytes {
            None => LbState::default(),
            Some(b) => {
                let data = pb::StateMachineData::decode(b.as_slice()).map_err(|e| {
                    StoreError::Corrupt {
                        path: self.path.clone(),
                        detail: format!("state machine: {e}"),
                    }
                })?;
                LbState::from_data(data).map_err(|detail| StoreError::Open {
                    path: self.path.clone(),
                    detail: format!("state machine {detail}"),
                })?
            }
        };
        let (tx, _) = watch::channel(Arc::new(state));
        Ok(StateMachineStore {
            store: self.clone(),
            state: Arc::new(tx),
        })
    }
}

/// openraft's log storage over [`Store`].
#[derive(Clone, Debug)]
pub struct LogStore {
    store: Store,
}

fn range_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let bounds = range_bounds(&range);
        self.store
            .blocking(move |db| {
                let txn = db.begin_read().map_err(io_err)?;
                let table = txn.open_table(LOG).map_err(io_err)?;
                let mut out = Vec::new();
                for item in table.range::<u64>(bounds).map_err(io_err)? {
                    let (_, v) = item.map_err(io_err)?;
                    let e = pb::Entry::decode(v.value()).map_err(|e| corrupt("log entry", e))?;
                    out.push(entry_from_pb(&e).map_err(|e| corrupt("log entry", e))?);
                }
                Ok(out)
            })
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.store
            .blocking(|db| {
                Store::get_meta(db, KEY_VOTE)?
                    .map(|b| {
                        let v = pb::Vote::decode(b.as_slice()).map_err(|e| corrupt("vote", e))?;
                        vote_from_pb(Some(&v), "stored").map_err(|e| corrupt("vote", e))
                    })
                    .transpose()
            })
            .await
    }
}

fn read_log_id(db: &Database, key: &str) -> io::Result<Option<LogId>> {
    Store::get_meta(db, key)?
        .map(|b| {
            pb::LogId::decode(b.as_slice())
                .map(|l| log_id_from_pb(&l))
                .map_err(|e| corrupt(key, e))
        })
        .transpose()
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        self.store
            .blocking(|db| {
                let purged = read_log_id(db, KEY_PURGED)?;
                let txn = db.begin_read().map_err(io_err)?;
                let table = txn.open_table(LOG).map_err(io_err)?;
                let last = match table.last().map_err(io_err)? {
                    Some((_, v)) => {
                        let e =
                            pb::Entry::decode(v.value()).map_err(|e| corrupt("log entry", e))?;
                        Some(
                            entry_from_pb(&e)
                                .map_err(|e| corrupt("log entry", e))?
                                .log_id,
                        )
                    }
                    None => purged,
                };
                Ok(LogState {
                    last_purged_log_id: purged,
                    last_log_id: last,
                })
            })
            .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = vote_to_pb(vote).encode_to_vec();
        self.store
            .blocking(move |db| Store::put_meta(db, &[(KEY_VOTE, Some(&bytes))]))
            .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let bytes = committed.map(|c| log_id_to_pb(&c).encode_to_vec());
        self.store
            .blocking(move |db| Store::put_meta(db, &[(KEY_COMMITTED, bytes.as_deref())]))
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.store
            .blocking(|db| read_log_id(db, KEY_COMMITTED))
            .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, entry_to_pb(&e).encode_to_vec()))
            .collect();
        let result = self
            .store
            .blocking(move |db| {
                let txn = db.begin_write().map_err(io_err)?;
                {
                    let mut table = txn.open_table(LOG).map_err(io_err)?;
                    for (index, bytes) in &encoded {
                        table.insert(*index, bytes.as_slice()).map_err(io_err)?;
                    }
                }
                txn.commit().map_err(io_err)
            })
            .await;
        match result {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.store
            .blocking(move |db| {
                let txn = db.begin_write().map_err(io_err)?;
                {
                    let mut table = txn.open_table(LOG).map_err(io_err)?;
                    table.retain_in(from.., |_, _| false).map_err(io_err)?;
                }
                txn.commit().map_err(io_err)
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let bytes = log_id_to_pb(&log_id).encode_to_vec();
        let upto = log_id.index;
        self.store
            .blocking(move |db| {
                let txn = db.begin_write().map_err(io_err)?;
                {
                    let mut meta = txn.open_table(META).map_err(io_err)?;
                    meta.insert(KEY_PURGED, bytes.as_slice()).map_err(io_err)?;
                    let mut table = txn.open_table(LOG).map_err(io_err)?;
                    table.retain_in(..=upto, |_, _| false).map_err(io_err)?;
                }
                txn.commit().map_err(io_err)
            })
            .await
    }
}

/// openraft's state machine over [`Store`], publishing every applied state.
#[derive(Clone)]
pub struct StateMachineStore {
    store: Store,
    state: Arc<watch::Sender<Arc<LbState>>>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("applied", &self.state.borrow().applied_index())
            .finish()
    }
}

impl StateMachineStore {
    /// Follows the applied state: the current value at once, then every
    /// change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<LbState>> {
        self.state.subscribe()
    }

    /// The applied state now.
    pub fn current(&self) -> Arc<LbState> {
        self.state.borrow().clone()
    }

    async fn persist(
        &self,
        state: &LbState,
        snapshot: Option<(&SnapshotMeta, &[u8])>,
    ) -> io::Result<()> {
        let data = state.data().encode_to_vec();
        let snap = snapshot.map(|(m, d)| (snapshot_meta_to_pb(m).encode_to_vec(), d.to_vec()));
        self.store
            .blocking(move |db| match &snap {
                None => Store::put_meta(db, &[(KEY_STATE, Some(&data))]),
                Some((meta, bytes)) => Store::put_meta(
                    db,
                    &[
                        (KEY_STATE, Some(&data)),
                        (KEY_SNAPSHOT_META, Some(meta)),
                        (KEY_SNAPSHOT_DATA, Some(bytes)),
                    ],
                ),
            })
            .await
    }
}

fn applied_of(state: &LbState) -> io::Result<(Option<LogId>, StoredMembership)> {
    let data = state.data();
    Ok((
        data.last_applied.as_ref().map(log_id_from_pb),
        stored_membership_from_pb(data.last_membership.as_ref())
            .map_err(|e| corrupt("membership", e))?,
    ))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let state = self.current();
        let (last_log_id, last_membership) = applied_of(&state)?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        let data = state.data().encode_to_vec();
        self.persist(&state, Some((&meta, &data))).await?;
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        applied_of(&self.current())
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut state = LbState::clone(&self.current());
        let mut replies = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let result = state.apply(&entry);
            if let Err(e) = &result {
                tracing::info!(log_id = %entry.log_id, error = %e, "command refused at apply");
            }
            if let Some(responder) = responder {
                replies.push((responder, result));
            }
        }
        // Durable before anyone sees it: a reader never acts on state that a
        // crash could take back.
        self.persist(&state, None).await?;
        self.state.send_replace(Arc::new(state));
        for (responder, result) in replies {
            responder.send(result);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let data = pb::StateMachineData::decode(snapshot.as_slice())
            .map_err(|e| corrupt("snapshot", e))?;
        let state = LbState::from_data(data).map_err(|e| corrupt("snapshot", e))?;
        self.persist(&state, Some((meta, &snapshot))).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        self.state.send_replace(Arc::new(state));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.store
            .blocking(|db| {
                let (Some(meta), Some(data)) = (
                    Store::get_meta(db, KEY_SNAPSHOT_META)?,
                    Store::get_meta(db, KEY_SNAPSHOT_DATA)?,
                ) else {
                    return Ok(None);
                };
                let meta = pb::SnapshotMeta::decode(meta.as_slice())
                    .map_err(|e| corrupt("snapshot meta", e))?;
                Ok(Some(Snapshot {
                    meta: snapshot_meta_from_pb(&meta).map_err(|e| corrupt("snapshot meta", e))?,
                    snapshot: data,
                }))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;

    /// Builds a fresh store in its own temporary directory; the guard keeps
    /// the directory alive for the test.
    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<
            (tempfile::TempDir, LogStore, StateMachineStore),
            openraft::StorageError<TypeConfig>,
        > {
            let dir = tempfile::tempdir().map_err(|e| {
                openraft::StorageError::from_io_error(
                    openraft::ErrorSubject::Store,
                    openraft::ErrorVerb::Read,
                    io_err(e),
                )
            })?;
            let store = Store::open(dir.path()).map_err(|e| {
                openraft::StorageError::from_io_error(
                    openraft::ErrorSubject::Store,
                    openraft::ErrorVerb::Read,
                    io_err(e),
                )
            })?;
            let sm = store.state_machine().await.map_err(|e| {
                openraft::StorageError::from_io_error(
                    openraft::ErrorSubject::Store,
                    openraft::ErrorVerb::Read,
                    io_err(e),
                )
            })?;
            Ok((dir, store.log_store(), sm))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.unwrap();
    }

    #[tokio::test]
    async fn vote_log_and_state_survive_reopening() {
        use openraft::vote::RaftLeaderId;

        use crate::raft::types::LeaderId;
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote {
            leader_id: LeaderId::new(7, 2),
            committed: true,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.cluster_id().await.unwrap(), None);
            let mut log = store.log_store();
            log.save_vote(&vote).await.unwrap();
            store.set_cluster_id("c1").await.unwrap();
            let entries = (1..=3).map(|i| Entry {
                log_id: LogId::new(LeaderId::new(7, 2), i),
                payload: openraft::EntryPayload::Blank,
            });
            log.append(entries, IOFlushed::noop()).await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mut log = store.log_store();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.cluster_id().await.unwrap().as_deref(), Some("c1"));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
    }
}
