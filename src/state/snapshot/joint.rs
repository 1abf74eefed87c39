//! Joint snapshots: a run's [`JointTable`] (every scope's hashes per phone,
//! `state/joint.rs`) kept as one file, which a re-run with the same sinks
//! maps instead of its per-scope snapshots.
//!
//! A joint snapshot is a cache of the per-scope snapshots, as they are of the
//! rows. Its descriptor (table `joint_snapshots`, keyed by the run's scope ids
//! in sink order) records the nonce of each member's per-scope snapshot it
//! was built from. A per-scope descriptor exists only while its scope's rows
//! are unchanged (the triggers of `snapshot.rs`), and a new one always has a
//! new nonce, so: the members' nonces all current ⇔ no member's rows changed
//! since. Nothing needs a trigger of its own, and an older build that writes
//! rows makes a joint snapshot stale the same way. Files are named
//! `joint-<nonce>.jtbl`, which an older build's clean-up never touches.

use std::fs::File;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{SnapshotError, checksum_of_words, verified, word, write_file};
use crate::state::index::{MappedWords, layout_fingerprint};
use crate::state::joint::{JointTable, MAX_COLUMNS};

/// The descriptors' table (additive to schema 2, like `snapshots`).
pub(in crate::state) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS joint_snapshots (
        scopes TEXT PRIMARY KEY, descriptor BLOB NOT NULL);";

/// First bytes of a descriptor and of a file.
const MAGIC: &[u8; 8] = b"CRMJNT01";

/// What the state records of a joint snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JointDescriptor {
    nonce: u64,
    /// Words in the file after its header.
    words: u64,
    columns: u64,
    phones: u64,
    checksum: u64,
    layout: u64,
    /// Per column: the nonce of the per-scope snapshot it was built from.
    members: Vec<u64>,
}

impl JointDescriptor {
    fn encode(&self) -> Vec<u8> {
        let head = [
            self.nonce,
            self.words,
            self.columns,
            self.phones,
            self.checksum,
            self.layout,
        ];
        let mut bytes = MAGIC.to_vec();
        for w in head.iter().chain(&self.members) {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<JointDescriptor> {
        if bytes.len() < 56 || &bytes[..8] != MAGIC || !bytes.len().is_multiple_of(8) {
            return None;
        }
        let words: Vec<u64> = bytes[8..].chunks_exact(8).map(word).collect();
        let descriptor = JointDescriptor {
            nonce: words[0],
            words: words[1],
            columns: words[2],
            phones: words[3],
            checksum: words[4],
            layout: words[5],
            members: words[6..].to_vec(),
        };
        (descriptor.members.len() as u64 == descriptor.columns).then_some(descriptor)
    }

    fn file_name(&self) -> String {
        format!("joint-{:016x}.jtbl", self.nonce)
    }

    /// The file's size in bytes: the header, then the words.
    fn file_bytes(&self) -> Option<u64> {
        self.words
            .checked_mul(8)?
            .checked_add(super::HEADER_BYTES as u64)
    }

    /// Whether it was built from the scopes' current per-scope snapshots (and
    /// by a build placing phones as this one does).
    fn is_current_for(&self, conn: &Connection, scope_ids: &[i64]) -> bool {
        self.layout == layout_fingerprint()
            && self.members.len() == scope_ids.len()
            && scope_ids.iter().zip(&self.members).all(|(&id, &nonce)| {
                super::descriptor(conn, id)
                    .is_some_and(|d| d.nonce == nonce && d.layout == layout_fingerprint())
            })
    }
}

/// The descriptors' key: the scope ids, in column order.
fn key(scope_ids: &[i64]) -> String {
    let ids: Vec<String> = scope_ids.iter().map(i64::to_string).collect();
    ids.join(",")
}

fn descriptor(conn: &Connection, scope_ids: &[i64]) -> Option<JointDescriptor> {
    let bytes: Vec<u8> = conn
        .query_row(
            "SELECT descriptor FROM joint_snapshots WHERE scopes = ?1",
            [key(scope_ids)],
            |row| row.get(0),
        )
        .optional()
        .ok()??;
    JointDescriptor::decode(&bytes)
}

/// The joint index of `scope_ids` (column `c` for `scope_ids[c]`) from its
/// snapshot, if it has a current one whose file is whole. Reading it stands
/// for reading its members' files: they are marked as read, so that the
/// run's end keeps them without a pass over them (a member file damaged
/// since is caught by the next run that reads it, and rewritten then).
pub(in crate::state) fn read(
    conn: &Connection,
    dir: &Path,
    scope_ids: &[i64],
) -> Option<JointTable> {
    let descriptor = descriptor(conn, scope_ids).filter(|d| d.is_current_for(conn, scope_ids))?;
    let path = dir.join(descriptor.file_name());
    let file = File::open(&path).ok()?;
    if file.metadata().ok()?.len() != descriptor.file_bytes()? {
        return None;
    }
    let map = super::map_whole(&file)?;
    if &map[..8] != MAGIC || word(&map[8..16]) != descriptor.nonce {
        return None;
    }
    let columns = usize::try_from(descriptor.columns).ok()?;
    let words = MappedWords::new(
        map,
        super::HEADER_BYTES,
        usize::try_from(descriptor.words).ok()?,
    )?;
    let (sum, phones) = checksum_of_words(words.words(), JointTable::stride_for(columns))?;
    if (sum, phones as u64) != (descriptor.checksum, descriptor.phones) {
        return None;
    }
    let table = JointTable::from_mapped(words, columns, phones)?;
    let mut read = verified();
    read.insert(path);
    for (&id, _) in scope_ids.iter().zip(&descriptor.members) {
        if let Some(member) = super::descriptor(conn, id) {
            read.insert(dir.join(member.file_name(id)));
        }
    }
    Some(table)
}

/// Whether `scope_ids` have a current joint snapshot: read whole by this
/// process and still there at its size, or whole now.
fn is_current(conn: &Connection, dir: &Path, scope_ids: &[i64]) -> bool {
    let read_before = descriptor(conn, scope_ids)
        .filter(|d| d.is_current_for(conn, scope_ids))
        .is_some_and(|d| {
            let path = dir.join(d.file_name());
            verified().contains(&path)
                && std::fs::metadata(&path).is_ok_and(|m| Some(m.len()) == d.file_bytes())
        });
    read_before || read(conn, dir, scope_ids).is_some()
}

/// Stores a joint snapshot of `scope_ids` if they have none current, built
/// from their per-scope snapshots (which `snapshot::refresh` has just made
/// current); then drops the descriptors of every stale joint snapshot.
/// Returns whether one was written. Nothing to join for fewer than two scopes.
pub(super) fn refresh(
    conn: &Connection,
    dir: &Path,
    scope_ids: &[i64],
) -> Result<bool, SnapshotError> {
    let joinable = (2..=MAX_COLUMNS).contains(&scope_ids.len());
    let written = joinable && !is_current(conn, dir, scope_ids) && write(conn, dir, scope_ids)?;
    drop_stale(conn)?;
    Ok(written)
}

fn write(conn: &Connection, dir: &Path, scope_ids: &[i64]) -> Result<bool, SnapshotError> {
    let members: Option<Vec<super::Descriptor>> = scope_ids
        .iter()
        .map(|&id| super::descriptor(conn, id))
        .collect();
    let Some(members) = members else {
        return Ok(false); // A member without a snapshot: nothing to build from.
    };
    let largest = members.iter().map(|d| d.phones).max().unwrap_or(0);
    let Some(mut joint) = JointTable::with_capacity(members.len(), largest as usize) else {
        return Ok(false);
    };
    // One member's table mapped at a time: a run's end peaks at the joint
    // table plus one scope's, not all of them.
    for (column, &id) in scope_ids.iter().enumerate() {
        let Some(table) = super::read(conn, dir, id) else {
            return Ok(false);
        };
        joint.fill_column(column, &table);
    }
    let stride = JointTable::stride_for(joint.columns());
    let (checksum, phones) =
        checksum_of_words(joint.words(), stride).expect("a joint table's stride is 2 to 16");
    let descriptor = JointDescriptor {
        nonce: super::new_nonce(scope_ids[0]),
        words: joint.words().len() as u64,
        columns: joint.columns() as u64,
        phones: phones as u64,
        checksum,
        layout: layout_fingerprint(),
        members: members.iter().map(|d| d.nonce).collect(),
    };
    write_file(
        dir,
        &descriptor.file_name(),
        MAGIC,
        descriptor.nonce,
        joint.words(),
    )?;
    conn.execute(
        "INSERT OR REPLACE INTO joint_snapshots (scopes, descriptor) VALUES (?1, ?2)",
        params![key(scope_ids), descriptor.encode()],
    )?;
    Ok(true)
}

/// Drops the descriptors of joint snapshots whose members changed (their
/// files are then removed as unnamed): a run with another set of sinks
/// would otherwise keep a stale file forever.
fn drop_stale(conn: &Connection) -> Result<(), SnapshotError> {
    let rows: Vec<(String, Vec<u8>)> = conn
        .prepare("SELECT scopes, descriptor FROM joint_snapshots")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (scopes, bytes) in rows {
        let ids: Option<Vec<i64>> = scopes.split(',').map(|id| id.parse().ok()).collect();
        let current = ids
            .zip(JointDescriptor::decode(&bytes))
            .is_some_and(|(ids, d)| d.is_current_for(conn, &ids));
        if !current {
            conn.execute("DELETE FROM joint_snapshots WHERE scopes = ?1", [scopes])?;
        }
    }
    Ok(())
}

/// The file names the joint descriptors name (kept by `remove_unnamed`).
pub(super) fn named_files(conn: &Connection) -> Result<Vec<String>, SnapshotError> {
    let mut names = Vec::new();
    let mut stmt = conn.prepare("SELECT descriptor FROM joint_snapshots")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        if let Some(descriptor) = JointDescriptor::decode(&row.get::<_, Vec<u8>>(0)?) {
            names.push(descriptor.file_name());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHONES: [u64; 3] = [5511987654321, 14155550123, 447911123456];

    /// Scopes 1 and 2 share a phone; scope 3 has one of its own, with hash 0.
    fn state() -> (Connection, tempfile::TempDir) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE delivered (scope_id INTEGER, phone INTEGER, payload_hash INTEGER);",
        )
        .unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for (scope, phone, hash) in [
            (1, PHONES[0], 11),
            (2, PHONES[0], 21),
            (1, PHONES[1], 12),
            (3, PHONES[2], 0),
        ] {
            conn.execute(
                "INSERT INTO delivered VALUES (?1, ?2, ?3)",
                params![scope, phone as i64, hash],
            )
            .unwrap();
        }
        (conn, tempfile::tempdir().unwrap())
    }

    fn refresh_all(conn: &mut Connection, dir: &Path) -> usize {
        super::super::refresh(conn, dir, &[1, 2, 3]).unwrap()
    }

    #[test]
    fn a_joint_snapshot_answers_as_its_members_while_they_are_current() {
        let (mut conn, dir) = state();
        let dir = dir.path();
        assert!(read(&conn, dir, &[1, 2, 3]).is_none(), "none yet");
        assert_eq!(
            refresh_all(&mut conn, dir),
            4,
            "three scopes and their joint"
        );
        let joint = read(&conn, dir, &[1, 2, 3]).expect("current");
        assert_eq!(joint.len(), 3);
        for phone in PHONES.into_iter().chain([5511900000000]) {
            for (column, id) in [1, 2, 3].into_iter().enumerate() {
                let own = super::super::read(&conn, dir, id).unwrap().get(phone);
                assert_eq!(joint.get(phone).and_then(|r| r.delivered(column)), own);
            }
        }
        assert!(
            read(&conn, dir, &[2, 1, 3]).is_none(),
            "another column order"
        );
        assert!(read(&conn, dir, &[1, 2]).is_none(), "another set of sinks");
        assert_eq!(refresh_all(&mut conn, dir), 0, "kept while current");

        // A member's rows change: its trigger drops its descriptor, which
        // makes the joint snapshot stale.
        conn.execute(
            "UPDATE delivered SET payload_hash = 5 WHERE scope_id = 3",
            [],
        )
        .unwrap();
        assert!(read(&conn, dir, &[1, 2, 3]).is_none(), "stale");
        assert_eq!(refresh_all(&mut conn, dir), 2, "scope 3 and the joint");
        let joint = read(&conn, dir, &[1, 2, 3]).unwrap();
        assert_eq!(joint.get(PHONES[2]).unwrap().delivered(2), Some(5));
        assert_eq!(named_files(&conn).unwrap().len(), 1);
    }

    #[test]
    fn a_joint_file_that_is_not_the_one_written_is_not_read() {
        let (mut conn, dir) = state();
        let dir = dir.path();
        refresh_all(&mut conn, dir);
        let path = dir.join(&named_files(&conn).unwrap()[0]);
        let good = std::fs::read(&path).unwrap();
        let altered = |change: &dyn Fn(&mut Vec<u8>), what: &str| {
            let mut bytes = good.clone();
            change(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            assert!(read(&conn, dir, &[1, 2, 3]).is_none(), "{what}");
        };
        altered(&|b| b.truncate(b.len() - 8), "truncated");
        altered(&|b| b[7] = b'2', "another format");
        altered(&|b| b[8] ^= 1, "another snapshot's nonce");
        let hash_at = (16..good.len())
            .step_by(32)
            .find(|&i| good[i] != 0)
            .unwrap()
            + 8;
        altered(&|b| b[hash_at] ^= 1, "a changed hash");
        std::fs::write(&path, &good).unwrap();
        assert!(read(&conn, dir, &[1, 2, 3]).is_some(), "restored");
    }

    /// The run's end does not read member files again after a joint read
    /// (their rows are unchanged, or the joint would not be current).
    #[test]
    fn reading_a_joint_snapshot_stands_for_reading_its_members() {
        let (mut conn, dir) = state();
        let dir = dir.path();
        refresh_all(&mut conn, dir);
        let member = dir.join(super::super::descriptor(&conn, 1).unwrap().file_name(1));
        // As in a new process: nothing of this state read yet. (Only this
        // test's paths: tests run side by side in one process.)
        verified().retain(|path| !path.starts_with(dir));
        let length = std::fs::metadata(&member).unwrap().len() as usize;
        std::fs::write(&member, vec![0u8; length]).unwrap();
        assert!(read(&conn, dir, &[1, 2, 3]).is_some());
        assert_eq!(refresh_all(&mut conn, dir), 0, "not read again");
        assert!(
            super::super::read(&conn, dir, 1).is_none(),
            "a run of that sink alone still reads it whole"
        );
    }
}
