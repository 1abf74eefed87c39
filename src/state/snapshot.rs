//! Snapshots: each scope's `(phone, hash)` pairs kept as one blob, so that a
//! re-run loads its index with one read instead of stepping SQLite through
//! every `delivered` row. Stepping 3 × 775k rows took 0.31 s before the first
//! input row could be decided, about half of a 1M-row dry run (issue 11).
//!
//! A snapshot is only a cache of the `delivered` rows, which stay the truth.
//! It exists only while it matches them: triggers delete a scope's snapshot in
//! the same transaction as any insert, update or delete of that scope's
//! `delivered` rows, whoever writes them (this build, an older one, or the
//! sqlite3 shell of the README's "Resetting"). The writer thread stores a
//! fresh one when a run ends, for each of its scopes that has none. A missing
//! or malformed snapshot falls back to the rows: a bad snapshot can only cost
//! time, never hide a delivery (which would send a message twice).

use rusqlite::{Connection, params};

/// The table and the triggers that keep every snapshot equal to its rows.
/// Additive to schema 2: an older build reads and writes the file as before,
/// and its writes drop the snapshots they make stale.
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS snapshots (
        scope_id INTEGER PRIMARY KEY, pairs BLOB NOT NULL);
    CREATE TRIGGER IF NOT EXISTS delivered_insert_drops_snapshot AFTER INSERT ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id = NEW.scope_id; END;
    CREATE TRIGGER IF NOT EXISTS delivered_update_drops_snapshot AFTER UPDATE ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id IN (OLD.scope_id, NEW.scope_id); END;
    CREATE TRIGGER IF NOT EXISTS delivered_delete_drops_snapshot AFTER DELETE ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id = OLD.scope_id; END;";

/// The blob's first bytes: names the format, so that another layout is never
/// read as this one.
const MAGIC: &[u8; 8] = b"CRMSNP01";

/// The scope's pairs from its snapshot, if it has a well-formed one. `None`
/// also for a file without the table (opened read-only, never by this build).
pub(super) fn read(conn: &Connection, scope_id: i64) -> Option<Vec<(u64, u64)>> {
    let mut stmt = conn
        .prepare_cached("SELECT pairs FROM snapshots WHERE scope_id = ?1")
        .ok()?;
    let mut rows = stmt.query([scope_id]).ok()?;
    let row = rows.next().ok()??;
    decode(row.get_ref(0).ok()?.as_blob().ok()?)
}

/// Stores a snapshot, from its rows, for each of `scope_ids` that has none
/// (one transaction); returns how many were written.
pub(super) fn refresh(conn: &mut Connection, scope_ids: &[i64]) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut written = 0;
    for &id in scope_ids {
        let present: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM snapshots WHERE scope_id = ?1)",
            [id],
            |r| r.get(0),
        )?;
        if !present {
            let pairs = super::delivered_rows(&tx, id)?;
            tx.execute(
                "INSERT INTO snapshots (scope_id, pairs) VALUES (?1, ?2)",
                params![id, encode(&pairs)],
            )?;
            written += 1;
        }
    }
    tx.commit()?;
    Ok(written)
}

/// `MAGIC`, then each pair as two little-endian u64, phones ascending.
fn encode(pairs: &[(u64, u64)]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(MAGIC.len() + pairs.len() * 16);
    blob.extend_from_slice(MAGIC);
    for (phone, hash) in pairs {
        blob.extend_from_slice(&phone.to_le_bytes());
        blob.extend_from_slice(&hash.to_le_bytes());
    }
    blob
}

/// The pairs of a blob `encode` wrote; `None` for anything else (another
/// format, a truncated blob, phones out of order or zero).
fn decode(blob: &[u8]) -> Option<Vec<(u64, u64)>> {
    let body = blob.strip_prefix(MAGIC)?;
    if body.len() % 16 != 0 {
        return None;
    }
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    let mut pairs = Vec::with_capacity(body.len() / 16);
    let mut last = 0;
    for pair in body.chunks_exact(16) {
        let phone = word(&pair[..8]);
        if phone <= last {
            return None;
        }
        last = phone;
        pairs.push((phone, word(&pair[8..])));
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decode_reads_what_encode_wrote(
            phones in proptest::collection::btree_set(1u64..u64::MAX, 0..200),
            hash in any::<u64>(),
        ) {
            let pairs: Vec<_> = phones.into_iter().map(|p| (p, hash ^ p)).collect();
            prop_assert_eq!(decode(&encode(&pairs)), Some(pairs));
        }
    }

    #[test]
    fn a_malformed_blob_is_not_read() {
        let good = encode(&[(5511987654321, 1), (5511987654322, 2)]);
        assert!(decode(&good).is_some());
        assert_eq!(decode(&good[..good.len() - 1]), None, "truncated");
        assert_eq!(decode(b"CRMSNP02"), None, "another format");
        let unsorted = encode(&[(5511987654322, 2), (5511987654321, 1)]);
        assert_eq!(decode(&unsorted), None, "out of order");
        assert_eq!(decode(&encode(&[(0, 1)])), None, "phone 0");
    }
}
