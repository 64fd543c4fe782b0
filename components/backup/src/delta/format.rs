//! The raw segment format (before zstd and age): `BWDELTA1` followed by
//! one record per event, integers little-endian:
//! `kind u8 (0 put, 1 delete) | revision i64 | create_revision i64 |
//! version i64 | lease i64 | observed_at_ms i64 | key_len u32 | key |
//! value_len u32 | value`. `revision` is the event's mod revision (for a
//! delete, the revision of the deletion); `observed_at_ms` is when the
//! watcher received it, which is what restoring "to a time" compares with.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Magic at the start of a raw segment.
const MAGIC: &[u8; 8] = b"BWDELTA1";
/// Fixed bytes per event besides key and value.
const EVENT_OVERHEAD: usize = 1 + 8 * 6 + 4 + 4;

/// Put or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A key was written.
    Put,
    /// A key was deleted.
    Delete,
}

/// One etcd event as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The revision that made it (mod revision; for a delete, the deletion's).
    pub revision: i64,
    /// The key's create revision (0 for a delete).
    pub create_revision: i64,
    /// The key's version after the event (0 for a delete).
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
    /// When the watcher received it, in Unix milliseconds.
    pub observed_at_ms: i64,
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a delete).
    pub value: Vec<u8>,
}

impl DeltaEvent {
    /// When the watcher received it.
    pub fn observed_at(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.observed_at_ms)
            .single()
            .unwrap_or_default()
    }

    pub(crate) fn encoded_len(&self) -> usize {
        EVENT_OVERHEAD + self.key.len() + self.value.len()
    }
}

/// The raw bytes of a segment.
pub fn encode_events(events: &[DeltaEvent]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(MAGIC.len() + events.iter().map(|e| e.encoded_len()).sum::<usize>());
    out.extend_from_slice(MAGIC);
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        for n in [
            e.revision,
            e.create_revision,
            e.version,
            e.lease,
            e.observed_at_ms,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for b in [&e.key, &e.value] {
            // Keys and values are bounded by etcd's request size (1.5 MiB
            // by default, at most 2 GiB by configuration): u32 holds them.
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
    out
}

/// Parses raw segment bytes; the error says where they stop making sense.
pub fn decode_events(raw: &[u8]) -> std::result::Result<Vec<DeltaEvent>, String> {
    let mut rest = raw
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a delta segment (missing BWDELTA1 header)")?;
    let mut events = Vec::new();
    fn take<'a>(
        rest: &mut &'a [u8],
        n: usize,
        what: &str,
    ) -> std::result::Result<&'a [u8], String> {
        if rest.len() < n {
            return Err(format!("truncated in {what}"));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head)
    }
    fn int(rest: &mut &[u8], what: &str) -> std::result::Result<i64, String> {
        let b = take(rest, 8, what)?;
        Ok(i64::from_le_bytes(b.try_into().map_err(|_| "bad integer")?))
    }
    fn blob(rest: &mut &[u8], what: &str) -> std::result::Result<Vec<u8>, String> {
        let len = take(rest, 4, what)?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| "bad length")?) as usize;
        Ok(take(rest, len, what)?.to_vec())
    }
    while !rest.is_empty() {
        let at = events.len();
        let kind = match take(&mut rest, 1, "event kind")?[0] {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            k => return Err(format!("event {at}: unknown kind {k}")),
        };
        let ctx = |f: &str| format!("event {at} {f}");
        events.push(DeltaEvent {
            kind,
            revision: int(&mut rest, &ctx("revision"))?,
            create_revision: int(&mut rest, &ctx("create revision"))?,
            version: int(&mut rest, &ctx("version"))?,
            lease: int(&mut rest, &ctx("lease"))?,
            observed_at_ms: int(&mut rest, &ctx("time"))?,
            key: blob(&mut rest, &ctx("key"))?,
            value: blob(&mut rest, &ctx("value"))?,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, revision: i64, key: &str, value: &[u8]) -> DeltaEvent {
        DeltaEvent {
            kind,
            revision,
            create_revision: 3,
            version: 2,
            lease: 7,
            observed_at_ms: 1_700_000_000_123,
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn segments_round_trip_and_truncation_is_named() {
        let events = vec![
            ev(EventKind::Put, 5, "a", b"\x00\xffbinary"),
            ev(EventKind::Delete, 6, "b", b""),
        ];
        let raw = encode_events(&events);
        assert_eq!(decode_events(&raw).unwrap(), events);
        let cut = &raw[..raw.len() - 3];
        assert!(decode_events(cut).unwrap_err().contains("event 1"));
        assert!(decode_events(b"garbage!").unwrap_err().contains("BWDELTA1"));
    }
}
