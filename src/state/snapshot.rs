//! Snapshots: each scope's index (its [`PhoneTable`] slots) kept as one file,
//! so that a re-run maps it into memory instead of stepping SQLite through
//! every `delivered` row. Stepping 3 × 775k rows took 0.38 s before the first
//! input row could be decided (issue 11).
//!
//! A snapshot is only a cache of the `delivered` rows, which stay the truth.
//! It exists only while it matches them: the state's `snapshots` table names
//! each scope's file (a descriptor: its nonce, slot count and checksum), and
//! triggers delete a scope's descriptor in the same transaction as any insert,
//! update or delete of that scope's `delivered` rows, whoever writes them
//! (this build, an older one, or the sqlite3 shell of the README's
//! "Resetting"). The writer thread stores a fresh one when a run ends, for
//! each of its scopes without a valid one. A missing, malformed or altered
//! file falls back to the rows: a bad snapshot can only cost time, never hide
//! a delivery (which would send a message twice).
//!
//! Why a file beside the state (`<state>.snapshots/`) and not a blob inside
//! it, as before: a blob had to be copied into fresh memory, which the kernel
//! zeroes first — 0.15 s of CPU for a re-run's 48 MB on the benchmark VM, more
//! than the copy itself (BENCHMARKS.md "Fifth pass"). A file is mapped: its
//! pages come from the page cache as they are. A file is never rewritten in
//! place: each snapshot has a new name (its nonce), so a mapped one never
//! changes under a reader, and the files no descriptor names are removed.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, OptionalExtension, params};

use super::PhoneTable;
use super::index::{MappedWords, Slot, layout_fingerprint};

pub(super) mod joint;

/// The descriptors' table and the triggers that drop a descriptor whenever
/// its rows change. Additive to schema 2: an older build reads and writes the
/// file as before, and its writes drop the snapshots they make stale. (The
/// column is still called `slots`: schema 2's builds stored the slots there.)
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS snapshots (
        scope_id INTEGER PRIMARY KEY, slots BLOB NOT NULL);
    CREATE TRIGGER IF NOT EXISTS delivered_insert_drops_snapshot AFTER INSERT ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id = NEW.scope_id; END;
    CREATE TRIGGER IF NOT EXISTS delivered_update_drops_snapshot AFTER UPDATE ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id IN (OLD.scope_id, NEW.scope_id); END;
    CREATE TRIGGER IF NOT EXISTS delivered_delete_drops_snapshot AFTER DELETE ON delivered
        BEGIN DELETE FROM snapshots WHERE scope_id = OLD.scope_id; END;";

/// First bytes of a descriptor and of a file: names the format, so that
/// another layout is never read as this one. A build that changes the slot
/// layout or the probing changes it too (a change of `dedup::hash` is caught
/// by [`layout_fingerprint`] anyway). `CRMTBL01` was the slots as a blob.
const MAGIC: &[u8; 8] = b"CRMTBL02";

/// A file's header: `MAGIC`, then its nonce; the slots follow, 8-byte aligned.
const HEADER_BYTES: usize = 16;

/// Bytes written at a time: 2 MiB, the size of a huge page, so that the
/// page cache holds the file in 2 MiB folios, which [`map_whole`] can map
/// with 2 MiB entries (ext4 sizes a buffered write's folio by the write).
const PIECE_BYTES: usize = 2 << 20;

/// The directory of a state file's snapshots: `<state>.snapshots`.
pub(super) fn dir_for(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".snapshots");
    PathBuf::from(name)
}

/// What the state records of a scope's snapshot (the `slots` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Descriptor {
    /// Random, so that every snapshot file has a name of its own.
    nonce: u64,
    /// Slots in the file.
    count: u64,
    /// Phones in those slots.
    phones: u64,
    /// [`checksum`] of the slots.
    checksum: u64,
    /// [`layout_fingerprint`] of the build that wrote it.
    layout: u64,
}

const DESCRIPTOR_BYTES: usize = 48;

impl Descriptor {
    fn encode(&self) -> Vec<u8> {
        let words = [
            self.nonce,
            self.count,
            self.phones,
            self.checksum,
            self.layout,
        ];
        let mut bytes = MAGIC.to_vec();
        words
            .iter()
            .for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Descriptor> {
        if bytes.len() != DESCRIPTOR_BYTES || &bytes[..8] != MAGIC {
            return None;
        }
        let at = |i: usize| word(&bytes[8 + 8 * i..16 + 8 * i]);
        Some(Descriptor {
            nonce: at(0),
            count: at(1),
            phones: at(2),
            checksum: at(3),
            layout: at(4),
        })
    }

    /// The file's size in bytes: the header, then `count` slots.
    fn file_bytes(&self) -> Option<u64> {
        let slots = self.count.checked_mul(size_of::<Slot>() as u64)?;
        slots.checked_add(HEADER_BYTES as u64)
    }

    /// The file's name in the snapshots directory.
    fn file_name(&self, scope_id: i64) -> String {
        format!("{scope_id}-{:016x}.tbl", self.nonce)
    }
}

/// A problem storing snapshots (only logged: they are a cache).
#[derive(Debug, thiserror::Error)]
pub(super) enum SnapshotError {
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The scope's index from its snapshot, if it has a valid one: the
/// descriptor in this build's format and layout, and its file whole (length,
/// header, nonce, checksum and phone count as recorded). `None` also for a
/// file without the table (opened read-only, never by this build).
pub(super) fn read(conn: &Connection, dir: &Path, scope_id: i64) -> Option<PhoneTable> {
    let descriptor = descriptor(conn, scope_id).filter(|d| d.layout == layout_fingerprint())?;
    let path = dir.join(descriptor.file_name(scope_id));
    let file = File::open(&path).ok()?;
    let count = usize::try_from(descriptor.count).ok()?;
    if file.metadata().ok()?.len() != descriptor.file_bytes()? {
        return None;
    }
    let map = map_whole(&file)?;
    if &map[..8] != MAGIC || word(&map[8..16]) != descriptor.nonce {
        return None;
    }
    let slots = MappedWords::new(map, HEADER_BYTES, count.checked_mul(2)?)?;
    let (sum, phones) = checksum(slots.slots::<2>());
    if (sum, phones as u64) != (descriptor.checksum, descriptor.phones) {
        return None;
    }
    let table = PhoneTable::from_mapped(slots, phones)?;
    verified().insert(path);
    Some(table)
}

/// Maps a snapshot file read-only, every page in place.
///
/// Lookups land on random slots: on 4 KiB pages nearly each one also missed
/// the TLB and paid a page walk (a virtual machine's are the dearest). The
/// file's page cache comes in 2 MiB folios when this build wrote it
/// (`PIECE_BYTES`), or, once it left the cache, when `MADV_HUGEPAGE` asks the
/// fault's readahead for them; the kernel then maps it with 2 MiB entries.
/// On the benchmark VM (kernel 6.18, ext4) smaps showed `FilePmdMapped:
/// 32768 kB` of the 32 MiB joint file, against 0 for a file written 64 KiB at
/// a time, and the merger's extra perf samples on a re-run fell from ≈ 240
/// to ≈ 60 (BENCHMARKS.md "Seventh pass"). Hints only: refused, the file
/// maps on small pages as before.
pub(super) fn map_whole(file: &File) -> Option<memmap2::Mmap> {
    // SAFETY (both mappings): read-only. crm-import never changes a snapshot
    // file once it is renamed into place (each snapshot has a name of its
    // own), and removing a mapped file leaves the mapping intact: only
    // another program truncating the file during the run could fault a read.
    #[cfg(target_os = "linux")]
    {
        let map = unsafe { memmap2::Mmap::map(file) }.ok()?;
        let _ = map.advise(memmap2::Advice::HugePage);
        // One call maps every page, instead of a fault per 64 KiB. A kernel
        // before 5.14 lacks it: map again, populated at once.
        if map.advise(memmap2::Advice::PopulateRead).is_ok() {
            return Some(map);
        }
    }
    unsafe { memmap2::MmapOptions::new().populate().map(file) }.ok()
}

/// The snapshot files this process has read whole ([`read`]): when the run
/// ends, `refresh` keeps them without reading them again (their names are
/// unique and a file is never changed once in place), instead of spending
/// another pass over 48 MB on the writer thread after the last row.
fn verified() -> MutexGuard<'static, HashSet<PathBuf>> {
    static VERIFIED: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);
    VERIFIED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether scope `scope_id` has a valid snapshot now: one this process read
/// whole and whose file is still there, or one that reads whole now.
fn is_current(conn: &Connection, dir: &Path, scope_id: i64) -> bool {
    let read_before = descriptor(conn, scope_id)
        .filter(|d| d.layout == layout_fingerprint())
        .is_some_and(|d| {
            let path = dir.join(d.file_name(scope_id));
            let bytes = d.file_bytes();
            verified().contains(&path)
                && std::fs::metadata(&path).is_ok_and(|m| Some(m.len()) == bytes)
        });
    read_before || read(conn, dir, scope_id).is_some()
}

/// Stores a snapshot, from its rows, for each of `scope_ids` without a valid
/// one, and their joint snapshot (`snapshot/joint.rs`) if it is not current
/// (one transaction); removes the files no descriptor names any more.
/// Returns how many files were written.
///
/// A file is complete and on disk (fsync'd) before the transaction that
/// names it commits; a run killed in between leaves only a file nothing
/// names, which the next refresh removes.
pub(super) fn refresh(
    conn: &mut Connection,
    dir: &Path,
    scope_ids: &[i64],
) -> Result<usize, SnapshotError> {
    let tx = conn.transaction()?;
    let mut written = 0;
    for &id in scope_ids {
        if !is_current(&tx, dir, id) {
            let table = PhoneTable::from_pairs(&super::delivered_rows(&tx, id)?);
            let descriptor = write(dir, id, table.slots())?;
            tx.execute(
                "INSERT OR REPLACE INTO snapshots (scope_id, slots) VALUES (?1, ?2)",
                params![id, descriptor.encode()],
            )?;
            written += 1;
        }
    }
    written += usize::from(joint::refresh(&tx, dir, scope_ids)?);
    tx.commit()?;
    remove_unnamed(conn, dir)?;
    Ok(written)
}

/// The scope's descriptor, if it has one in this build's format (one of
/// another format is replaced by `refresh`, not kept forever).
fn descriptor(conn: &Connection, scope_id: i64) -> Option<Descriptor> {
    let bytes: Vec<u8> = conn
        .query_row(
            "SELECT slots FROM snapshots WHERE scope_id = ?1",
            [scope_id],
            |row| row.get(0),
        )
        .optional()
        .ok()??;
    Descriptor::decode(&bytes)
}

/// Writes `slots` as scope `scope_id`'s next snapshot file.
fn write(dir: &Path, scope_id: i64, slots: &[Slot]) -> Result<Descriptor, SnapshotError> {
    let (checksum, phones) = checksum(slots);
    let descriptor = Descriptor {
        nonce: new_nonce(scope_id),
        count: slots.len() as u64,
        phones: phones as u64,
        checksum,
        layout: layout_fingerprint(),
    };
    let name = descriptor.file_name(scope_id);
    write_file(dir, &name, MAGIC, descriptor.nonce, slots.as_flattened())?;
    Ok(descriptor)
}

/// A random nonce, so that every snapshot file has a name of its own.
fn new_nonce(seed: i64) -> u64 {
    std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), seed)
}

/// Writes a snapshot file `name` in `dir`: `magic`, `nonce`, then `words`
/// little-endian — under a temporary name, fsync'd, then renamed into place.
fn write_file(
    dir: &Path,
    name: &str,
    magic: &[u8; 8],
    nonce: u64,
    words: &[u64],
) -> Result<(), SnapshotError> {
    let temporary = dir.join(format!(".{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let file = File::create(&temporary).map_err(io(&temporary))?;
    let mut out = BufWriter::with_capacity(PIECE_BYTES, file);
    out.write_all(magic)
        .and_then(|_| out.write_all(&nonce.to_le_bytes()))
        .and_then(|_| {
            words
                .iter()
                .try_for_each(|word| out.write_all(&word.to_le_bytes()))
        })
        .map_err(io(&temporary))?;
    let file = out
        .into_inner()
        .map_err(|e| io(&temporary)(e.into_error()))?;
    file.sync_all().map_err(io(&temporary))?;
    std::fs::rename(&temporary, dir.join(name)).map_err(io(&temporary))
}

/// Removes the snapshot files (and temporary files) in `dir` that no
/// descriptor names: left by a scope whose rows changed, or by a run killed
/// while writing. Only names of this module's making are touched.
fn remove_unnamed(conn: &Connection, dir: &Path) -> Result<(), SnapshotError> {
    let mut named = HashSet::new();
    let mut stmt = conn.prepare("SELECT scope_id, slots FROM snapshots")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (id, bytes): (i64, Vec<u8>) = (row.get(0)?, row.get(1)?);
        if let Some(descriptor) = Descriptor::decode(&bytes) {
            named.insert(descriptor.file_name(id));
        }
    }
    named.extend(joint::named_files(conn)?);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(()); // No directory: nothing to remove.
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let snapshot = name.ends_with(".tbl") || name.ends_with(".jtbl");
        let temporary =
            name.starts_with('.') && (name.ends_with(".tbl.tmp") || name.ends_with(".jtbl.tmp"));
        let ours = snapshot || temporary;
        if ours && !named.contains(&name) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| SnapshotError::Io { path, source })?;
        }
    }
    Ok(())
}

/// Fletcher-style sums of the slots' words, and the phones among them:
/// catches a file that is not the one written (torn by a power loss, edited,
/// or copied from another state) at memory speed, a few additions per slot.
/// Not a defence against anyone forging a file on purpose, which the state's
/// own file would not resist either. A slot's first word is its key, the
/// others hashes; for two-word slots these are the sums every snapshot file
/// written so far carries.
fn checksum<const W: usize>(slots: &[[u64; W]]) -> (u64, usize) {
    let (mut sum, mut sum_of_sums, mut phones) = (0u64, 0u64, 0usize);
    for slot in slots {
        sum = sum.wrapping_add(slot[0]);
        for hash in &slot[1..] {
            sum = sum.wrapping_add(hash.rotate_left(29));
        }
        sum_of_sums = sum_of_sums.wrapping_add(sum);
        phones += usize::from(slot[0] != 0);
    }
    (sum ^ sum_of_sums.rotate_left(32), phones)
}

/// [`checksum`] of `words` read as slots of `stride` words (a power of two
/// up to 16: a slot's size is fixed at compile time, so that the loop over
/// 32 MB of slots stays a few additions each); `None` for another stride.
fn checksum_of_words(words: &[u64], stride: usize) -> Option<(u64, usize)> {
    match stride {
        2 => Some(checksum(words.as_chunks::<2>().0)),
        4 => Some(checksum(words.as_chunks::<4>().0)),
        8 => Some(checksum(words.as_chunks::<8>().0)),
        16 => Some(checksum(words.as_chunks::<16>().0)),
        _ => None,
    }
}

fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An in-memory state with scope 1's `delivered` rows, and a snapshots directory.
    fn state_with(pairs: &[(u64, u64)]) -> (Connection, tempfile::TempDir) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE delivered (scope_id INTEGER, phone INTEGER, payload_hash INTEGER);",
        )
        .unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(joint::SCHEMA).unwrap();
        for &(phone, hash) in pairs {
            conn.execute(
                "INSERT INTO delivered VALUES (1, ?1, ?2)",
                params![phone as i64, hash as i64],
            )
            .unwrap();
        }
        (conn, tempfile::tempdir().unwrap())
    }

    /// The path of scope 1's snapshot file.
    fn file_of(conn: &Connection, dir: &Path) -> PathBuf {
        dir.join(descriptor(conn, 1).expect("a descriptor").file_name(1))
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    proptest! {
        // Each case inserts thousands of rows into a debug-built SQLite.
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Tables of several write pieces: 5,000 phones take 8,192 slots, 128 KiB.
        #[test]
        fn refresh_writes_what_read_gives_back(
            phones in proptest::collection::hash_set(1u64..u64::MAX / 2, 0..5000),
        ) {
            let pairs: Vec<_> = phones.iter().map(|&p| (p, p / 3)).collect();
            let (mut conn, dir) = state_with(&pairs);
            prop_assert_eq!(refresh(&mut conn, dir.path(), &[1]).unwrap(), 1);
            let back = read(&conn, dir.path(), 1).expect("a well-formed snapshot");
            prop_assert_eq!(back.len(), phones.len());
            for &phone in &phones {
                prop_assert_eq!(back.get(phone), Some(phone / 3));
            }
        }
    }

    /// Whatever happened to the file, a snapshot that is not the one its
    /// descriptor describes is not read (the rows are then read instead).
    #[test]
    fn a_snapshot_file_that_is_not_the_one_written_is_not_read() {
        let (mut conn, dir) = state_with(&[(5511987654321, 1), (5511987654322, 2)]);
        let dir = dir.path();
        assert!(read(&conn, dir, 1).is_none(), "no snapshot yet");
        refresh(&mut conn, dir, &[1]).unwrap();
        assert_eq!(read(&conn, dir, 1).unwrap().get(5511987654322), Some(2));
        assert!(read(&conn, dir, 2).is_none(), "another scope has none");
        let path = file_of(&conn, dir);
        let good = std::fs::read(&path).unwrap();
        let altered = |change: &dyn Fn(&mut Vec<u8>), what: &str| {
            let mut bytes = good.clone();
            change(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            assert!(read(&conn, dir, 1).is_none(), "{what}");
        };
        altered(&|b| b.truncate(b.len() - 16), "truncated");
        altered(&|b| b[7] = b'1', "another format");
        altered(&|b| b[8] ^= 1, "another snapshot's nonce");
        // A hash changed: still a well-formed table, only the checksum tells.
        let hash_at = (16..good.len())
            .step_by(16)
            .find(|&i| good[i] != 0)
            .unwrap()
            + 8;
        altered(&|b| b[hash_at] ^= 1, "a changed hash");
        std::fs::write(&path, &good).unwrap();
        assert!(read(&conn, dir, 1).is_some(), "restored");
        let mut other_layout = descriptor(&conn, 1).unwrap();
        other_layout.layout ^= 1;
        conn.execute(
            "UPDATE snapshots SET slots = ?1 WHERE scope_id = 1",
            [other_layout.encode()],
        )
        .unwrap();
        assert!(
            read(&conn, dir, 1).is_none(),
            "written by a build placing phones elsewhere"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(read(&conn, dir, 1).is_none(), "missing file");
        let bare = Connection::open_in_memory().unwrap();
        assert!(read(&bare, dir, 1).is_none(), "no table");
    }

    /// A snapshot file is mapped with huge pages asked for (see `map_whole`).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_snapshot_file_is_mapped_asking_for_huge_pages() {
        let pairs: Vec<_> = (1..=5000u64).map(|p| (5511900000000 + p, p)).collect();
        let (mut conn, dir) = state_with(&pairs);
        refresh(&mut conn, dir.path(), &[1]).unwrap();
        let file = File::open(file_of(&conn, dir.path())).unwrap();
        let map = map_whole(&file).expect("mapped");
        let flags = crate::state::index::tests::vm_flags_at(map.as_ptr() as usize);
        if let Some(flags) = flags {
            assert!(flags.iter().any(|f| f == "hg"), "VmFlags: {flags:?}");
        }
    }

    /// What a run's load read whole, its end keeps without a second pass
    /// (the file is only checked to be still there, at its size).
    #[test]
    fn refresh_keeps_a_snapshot_this_process_read_without_reading_it_again() {
        let (mut conn, dir) = state_with(&[(5511987654321, 1)]);
        let dir = dir.path();
        refresh(&mut conn, dir, &[1]).unwrap();
        assert!(read(&conn, dir, 1).is_some());
        let path = file_of(&conn, dir);
        let length = std::fs::metadata(&path).unwrap().len() as usize;
        std::fs::write(&path, vec![0u8; length]).unwrap();
        assert_eq!(refresh(&mut conn, dir, &[1]).unwrap(), 0, "not read again");
        assert!(read(&conn, dir, 1).is_none(), "a load still reads it whole");
        std::fs::write(&path, b"shorter").unwrap();
        assert_eq!(
            refresh(&mut conn, dir, &[1]).unwrap(),
            1,
            "its size changed"
        );
    }

    #[test]
    fn refresh_replaces_what_is_not_a_valid_snapshot_and_removes_unnamed_files() {
        let (mut conn, dir) = state_with(&[(5511987654321, 9)]);
        let dir = dir.path();
        conn.execute("INSERT INTO delivered VALUES (2, 5511987654322, 8)", [])
            .unwrap();
        // Stored after the rows (whose triggers dropped the first one).
        conn.execute(
            "INSERT INTO snapshots VALUES (1, 'CRMTBL01 the slots, as schema 2 kept them')",
            [],
        )
        .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("7-00000000000000aa.tbl"),
            b"left by a changed scope",
        )
        .unwrap();
        std::fs::write(dir.join(".1-00000000000000bb.tbl.tmp"), b"a killed write").unwrap();
        std::fs::write(dir.join("notes.txt"), b"not ours").unwrap();
        std::fs::write(dir.join("joint-00000000000000cc.jtbl"), b"a stale joint").unwrap();
        // Two scopes and their joint snapshot.
        assert_eq!(refresh(&mut conn, dir, &[1, 2]).unwrap(), 3);
        assert_eq!(
            refresh(&mut conn, dir, &[1, 2]).unwrap(),
            0,
            "kept once valid"
        );
        assert_eq!(read(&conn, dir, 1).unwrap().get(5511987654321), Some(9));
        assert_eq!(read(&conn, dir, 2).unwrap().get(5511987654322), Some(8));
        let two = descriptor(&conn, 2).unwrap().file_name(2);
        let joint = joint::named_files(&conn).unwrap();
        assert_eq!(joint.len(), 1);
        let mut expected = [file_of(&conn, dir), dir.join(&two), dir.join("notes.txt")]
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .chain(joint.clone())
            .collect::<Vec<_>>();
        expected.sort();
        assert_eq!(names_in(dir), expected);

        // A file gone (a state copied without its directory): written again,
        // and the joint snapshot built on the old one too.
        std::fs::remove_file(file_of(&conn, dir)).unwrap();
        assert_eq!(refresh(&mut conn, dir, &[1, 2]).unwrap(), 2);
        assert!(read(&conn, dir, 1).is_some());
        assert!(
            !dir.join(&joint[0]).exists(),
            "the stale joint file is removed"
        );
        // Rows changed: the trigger drops the descriptor, refresh the old
        // file, and the joint snapshot it belonged to.
        let old = file_of(&conn, dir);
        let joint = joint::named_files(&conn).unwrap();
        conn.execute("DELETE FROM delivered WHERE scope_id = 1", [])
            .unwrap();
        assert_eq!(refresh(&mut conn, dir, &[2]).unwrap(), 0);
        assert!(!old.exists(), "the stale file is removed");
        assert!(!dir.join(&joint[0]).exists(), "and the stale joint file");
        assert!(joint::named_files(&conn).unwrap().is_empty());
    }
}
