//! Snapshots: each scope's index (its [`PhoneTable`] slots) kept as one blob,
//! so that a re-run loads it with one read instead of stepping SQLite through
//! every `delivered` row. Stepping 3 × 775k rows took 0.38 s before the first
//! input row could be decided; the snapshots take about 0.04 s (issue 11).
//!
//! A snapshot is only a cache of the `delivered` rows, which stay the truth.
//! It exists only while it matches them: triggers delete a scope's snapshot in
//! the same transaction as any insert, update or delete of that scope's
//! `delivered` rows, whoever writes them (this build, an older one, or the
//! sqlite3 shell of the README's "Resetting"). The writer thread stores a
//! fresh one when a run ends, for each of its scopes that has none. A missing
//! or malformed snapshot falls back to the rows: a bad snapshot can only cost
//! time, never hide a delivery (which would send a message twice).

use rusqlite::{Connection, MAIN_DB, params};

use super::PhoneTable;

/// The table and the triggers that keep every snapshot equal to its rows.
/// Additive to schema 2: an older build reads and writes the file as before,
/// and its writes drop the snapshots they make stale.
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS snapshots (
        scope_id INTEGER PRIMARY KEY, slots BLOB NOT NULL);
    CREATE TRIGGER IF NOT EXISTS delivered_insert_drops_snapshot AFTER INSERT ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id = NEW.scope_id; END;
    CREATE TRIGGER IF NOT EXISTS delivered_update_drops_snapshot AFTER UPDATE ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id IN (OLD.scope_id, NEW.scope_id); END;
    CREATE TRIGGER IF NOT EXISTS delivered_delete_drops_snapshot AFTER DELETE ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id = OLD.scope_id; END;";

/// The blob's first bytes: names the format, so that another layout is never
/// read as this one. A build that changes the slot layout or `dedup::hash`
/// changes it too (and `PhoneTable::from_slots` refuses misplaced slots anyway).
const MAGIC: &[u8; 8] = b"CRMTBL01";

/// Bytes read or written at a time: slots are converted piece by piece,
/// never as a second copy of the whole table in memory.
const PIECE_BYTES: usize = 64 * 1024;

/// The scope's index from its snapshot, if it has a well-formed one. `None`
/// also for a file without the table (opened read-only, never by this build).
///
/// The blob is the index's own slot array ([`PhoneTable::slots`]), read back
/// as is and checked in one pass ([`PhoneTable::from_slots`]): rebuilding the
/// table from pairs instead cost 33 ms per 775k contacts in random writes.
pub(super) fn read(conn: &Connection, scope_id: i64) -> Option<PhoneTable> {
    let blob = open_current(conn, scope_id)?;
    let body = blob.len() - MAGIC.len();
    if !body.is_multiple_of(16) {
        return None;
    }
    let mut slots = super::index::empty_slots(body / 16);
    let mut buf = vec![0u8; PIECE_BYTES];
    for (i, part) in slots.chunks_mut(PIECE_BYTES / 16).enumerate() {
        let bytes = &mut buf[..part.len() * 16];
        blob.read_at_exact(bytes, MAGIC.len() + i * PIECE_BYTES)
            .ok()?;
        for (slot, pair) in part.iter_mut().zip(bytes.chunks_exact(16)) {
            *slot = (word(&pair[..8]), word(&pair[8..]));
        }
    }
    PhoneTable::from_slots(slots)
}

/// Stores a snapshot, from its rows, for each of `scope_ids` that has none
/// (one transaction); returns how many were written.
pub(super) fn refresh(conn: &mut Connection, scope_ids: &[i64]) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut written = 0;
    for &id in scope_ids {
        if open_current(&tx, id).is_none() {
            tx.execute("DELETE FROM snapshots WHERE scope_id = ?1", [id])?;
            let table = PhoneTable::from_pairs(&super::delivered_rows(&tx, id)?);
            write(&tx, id, table.slots())?;
            written += 1;
        }
    }
    tx.commit()?;
    Ok(written)
}

/// The scope's snapshot blob, opened for reading, if it has one in this
/// build's format (one of another format is replaced by `refresh`, not kept
/// forever beside the rows).
fn open_current(conn: &Connection, scope_id: i64) -> Option<rusqlite::blob::Blob<'_>> {
    let blob = conn
        .blob_open(MAIN_DB, "snapshots", "slots", scope_id, true)
        .ok()?;
    let mut magic = [0u8; 8];
    blob.read_at_exact(&mut magic, 0).ok()?;
    (&magic == MAGIC).then_some(blob)
}

/// Stores `slots` as scope `scope_id`'s snapshot: `MAGIC`, then each slot as
/// two little-endian u64. Written in `PIECE_BYTES` pieces into a blob sized
/// up front, so that neither this code nor SQLite (which copies a bound
/// parameter) holds a second 16 MB copy of the table.
fn write(conn: &Connection, scope_id: i64, slots: &[(u64, u64)]) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO snapshots (scope_id, slots) VALUES (?1, zeroblob(?2))",
        params![scope_id, (MAGIC.len() + slots.len() * 16) as i64],
    )?;
    let mut blob = conn.blob_open(MAIN_DB, "snapshots", "slots", scope_id, false)?;
    blob.write_all_at(MAGIC, 0)?;
    let mut buf = Vec::with_capacity(PIECE_BYTES);
    for (i, part) in slots.chunks(PIECE_BYTES / 16).enumerate() {
        encode_slots(part, &mut buf);
        blob.write_all_at(&buf, MAGIC.len() + i * PIECE_BYTES)?;
    }
    Ok(())
}

/// `slots` as little-endian bytes, into `out` (cleared first).
fn encode_slots(slots: &[(u64, u64)], out: &mut Vec<u8>) {
    out.clear();
    for (phone, hash) in slots {
        out.extend_from_slice(&phone.to_le_bytes());
        out.extend_from_slice(&hash.to_le_bytes());
    }
}

fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The blob `write` stores for `table`, built in one piece.
    fn encode(table: &PhoneTable) -> Vec<u8> {
        let mut body = Vec::new();
        encode_slots(table.slots(), &mut body);
        [MAGIC.as_slice(), &body].concat()
    }

    /// A connection holding `blob` as scope 1's snapshot.
    fn stored(blob: &[u8]) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE delivered (scope_id INTEGER, phone INTEGER, payload_hash INTEGER);",
        )
        .unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO snapshots (scope_id, slots) VALUES (1, ?1)",
            [blob],
        )
        .unwrap();
        conn
    }

    proptest! {
        /// Several read buffers' worth too: 5,000 phones take 8,192 slots, 128 KiB.
        #[test]
        fn read_gives_back_what_encode_stored(
            phones in proptest::collection::hash_set(1u64..u64::MAX, 0..5000),
        ) {
            let pairs: Vec<_> = phones.iter().map(|&p| (p, p.rotate_left(7))).collect();
            let table = PhoneTable::from_pairs(&pairs);
            let back = read(&stored(&encode(&table)), 1).expect("a well-formed snapshot");
            prop_assert_eq!(back.slots(), table.slots());
            prop_assert_eq!(back.len(), pairs.len());
        }
    }

    #[test]
    fn a_malformed_blob_is_not_read() {
        let good = encode(&PhoneTable::from_pairs(&[
            (5511987654321, 1),
            (5511987654322, 2),
        ]));
        assert!(read(&stored(&good), 1).is_some());
        assert!(read(&stored(&good), 2).is_none(), "no snapshot");
        assert!(
            read(&stored(&good[..good.len() - 1]), 1).is_none(),
            "truncated"
        );
        let mut other = good.clone();
        other[7] = b'2';
        assert!(read(&stored(&other), 1).is_none(), "another format");
        let conn = Connection::open_in_memory().unwrap();
        assert!(read(&conn, 1).is_none(), "no table");
    }

    proptest! {
        // Each case inserts thousands of rows into a debug-built SQLite.
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Tables of several write pieces: 5,000 phones take 8,192 slots, 128 KiB.
        #[test]
        fn refresh_writes_what_read_gives_back(
            phones in proptest::collection::hash_set(1u64..u64::MAX / 2, 0..5000),
        ) {
            let mut conn = stored(b"");
            let tx = conn.transaction().unwrap();
            for &phone in &phones {
                tx.execute(
                    "INSERT INTO delivered VALUES (1, ?1, ?2)",
                    params![phone as i64, (phone / 3) as i64],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            prop_assert_eq!(refresh(&mut conn, &[1]).unwrap(), 1);
            let back = read(&conn, 1).expect("a well-formed snapshot");
            prop_assert_eq!(back.len(), phones.len());
            for &phone in &phones {
                prop_assert_eq!(back.get(phone), Some(phone / 3));
            }
        }
    }

    #[test]
    fn refresh_replaces_a_snapshot_of_another_format() {
        let mut conn = stored(b"");
        conn.execute(
            "INSERT INTO delivered VALUES (1, 5511987654321, 9), (2, 5511987654322, 8)",
            [],
        )
        .unwrap();
        // Stored after the rows (whose triggers dropped the first one).
        conn.execute(
            "INSERT INTO snapshots VALUES (1, 'CRMTBL00 laid out by another build')",
            [],
        )
        .unwrap();
        assert_eq!(refresh(&mut conn, &[1, 2]).unwrap(), 2);
        assert_eq!(refresh(&mut conn, &[1, 2]).unwrap(), 0, "kept once current");
        assert_eq!(read(&conn, 1).unwrap().get(5511987654321), Some(9));
        assert_eq!(read(&conn, 2).unwrap().get(5511987654322), Some(8));
    }
}
