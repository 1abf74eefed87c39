//! The state's in-memory index: phone → payload hash, built once at start and
//! then only read, by every row of every sink of a re-run.
//!
//! Hand-written (open addressing, linear probing, one array of pairs) instead
//! of a `HashMap` for three measured reasons (perf on a 1M-row re-run, issue 11):
//! - a lookup in a table far larger than the cache costs one trip to memory
//!   per cache line it touches. hashbrown touches two (its control bytes and
//!   its buckets are separate arrays); this table one, as a key and its hash
//!   sit together and probes run along the same line;
//! - the merger knows which phones come next, so it can ask for their lines
//!   ahead ([`PhoneTable::prefetch`]), which no map crate offers;
//! - the slot array is a plain layout a snapshot file holds as is, so a
//!   re-run maps it instead of building or copying it ([`MappedWords`]).
//!
//! Memory: 16 bytes per slot at a load between 3/8 and 3/4, like hashbrown.

use std::ops::Deref;

/// How many pairs ahead [`PhoneTable::from_pairs`] prefetches.
const PREFETCH_AHEAD: usize = 8;

/// One slot: `[phone, hash]`; phone 0 marks an empty slot. An array, not a
/// tuple, because its layout (two u64, in that order) is guaranteed, which
/// a mapped snapshot relies on.
pub type Slot = [u64; 2];

/// Starts loading the cache line holding `at` (only a hint: it changes nothing).
#[inline]
pub(super) fn prefetch_line<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is a hint; it never faults, and `at` is a valid reference.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((at as *const T).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Phone digits (never 0: an E.164 number starts with a country code) → hash.
#[derive(Debug)]
pub struct PhoneTable {
    /// The slots' words, two per slot.
    slots: Words,
    len: usize,
}

/// Where a table's words live (this one's and the joint table's).
#[derive(Debug)]
pub(super) enum Words {
    Owned(Box<[u64]>),
    Mapped(MappedWords),
}

impl Deref for Words {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        match self {
            Words::Owned(words) => words,
            Words::Mapped(mapped) => mapped.words(),
        }
    }
}

impl Words {
    /// The words, to change: mapped ones are copied into memory first (the
    /// file stays as it was).
    pub(super) fn owned_mut(&mut self) -> &mut [u64] {
        if let Words::Mapped(mapped) = self {
            let mut copy = empty_words(mapped.words().len());
            copy.copy_from_slice(mapped.words());
            *self = Words::Owned(copy);
        }
        match self {
            Words::Owned(words) => words,
            Words::Mapped(_) => unreachable!("copied just above"),
        }
    }
}

/// Words read in place from a file mapped into memory (a snapshot,
/// `snapshot.rs`). A re-run's three tables are 48 MB: copied into fresh
/// memory, the kernel first zeroed every page of it — on this project's
/// benchmark VM, 0.15 s of CPU, more than the copy itself (perf,
/// BENCHMARKS.md "Fifth pass"). Pages of a mapped file come from the page
/// cache as they are, with nothing to zero or copy.
pub struct MappedWords {
    map: memmap2::Mmap,
    /// Byte offset of the first word in `map`.
    start: usize,
    count: usize,
}

impl std::fmt::Debug for MappedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedWords({} words)", self.count)
    }
}

impl MappedWords {
    /// `count` u64 words at byte `start` of `map`, if they lie inside it,
    /// 8-byte aligned, and the machine reads u64 little-endian (the file's order).
    pub fn new(map: memmap2::Mmap, start: usize, count: usize) -> Option<MappedWords> {
        let end = count.checked_mul(size_of::<u64>())?.checked_add(start)?;
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(align_of::<u64>());
        (cfg!(target_endian = "little") && end <= map.len() && aligned).then_some(MappedWords {
            map,
            start,
            count,
        })
    }

    pub fn words(&self) -> &[u64] {
        // SAFETY: `new` checked that `count` words from `start` lie inside the
        // mapping and are aligned for u64; any bit pattern is a valid u64, and
        // on a little-endian machine the bytes read as the file's words. The
        // mapping is read-only and private, and lives as long as `self`. (A
        // file truncated by another program while mapped would fault; the run
        // lock keeps crm-import itself from ever doing so, and a snapshot file
        // is never rewritten in place.)
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.start).cast::<u64>(), self.count)
        }
    }

    /// The words as slots of `W` words (whole slots only).
    pub fn slots<const W: usize>(&self) -> &[[u64; W]] {
        self.words().as_chunks::<W>().0
    }
}

/// `n` zero words, in memory the kernel is asked to back with 2 MiB pages.
///
/// A re-run without snapshots looks each row up in three tables of 16 MiB:
/// 4,096 small pages each, far more than the TLB holds, so lookups pay page
/// walks on top of their cache misses (2 MiB pages: −18% of the merger
/// thread's perf samples on a 1M-row re-run, BENCHMARKS.md "Fourth pass").
/// This machine's kernel gives huge pages only to memory that asks
/// (`transparent_hugepage` = `madvise`, the common default), so ask:
/// `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned part of the fresh, still
/// untouched allocation. Only advice: where it is refused or unknown, the
/// table works the same on small pages.
pub fn empty_words(n: usize) -> Box<[u64]> {
    let words = vec![0u64; n].into_boxed_slice();
    advise_huge_pages(words.as_ptr().cast(), std::mem::size_of_val(&*words));
    words
}

/// `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned part of `bytes` bytes at
/// `start`, a fresh allocation the caller owns (see [`empty_words`]).
fn advise_huge_pages(start: *const u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, end) = (start as usize, start as usize + bytes);
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last > first {
            // SAFETY: [first, last) lies inside the caller's allocation;
            // MADV_HUGEPAGE changes how pages are backed, never their
            // contents, and its failure is harmless (ignored).
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

/// Names where this build places phones: the hash of a few fixed phones
/// (a slot's probe starts at its phone's hash), and the slot size. A snapshot records it, and one written by
/// a build that placed phones elsewhere (another `dedup::hash`) is not read,
/// whose lookups would miss every phone and send everything again. (Linear
/// probing itself is pinned by `the_layout_fingerprint_is_pinned`.)
pub fn layout_fingerprint() -> u64 {
    [1u64, 5511987654321, 14155550123]
        .iter()
        .fold(size_of::<Slot>() as u64, |acc, &phone| {
            acc.rotate_left(21) ^ crate::dedup::hash(phone)
        })
}

/// The slot of `slots` holding `phone`, or the empty slot where it would go.
/// (Free functions over the slice, not methods: the slice is taken from
/// [`Slots`] once per lookup, not at every probe step.)
#[inline]
fn find(slots: &[Slot], phone: u64) -> usize {
    let mask = slots.len() - 1;
    let mut slot = home(slots, phone);
    // The table is never full (load ≤ 3/4), so an empty slot ends every probe.
    while slots[slot][0] != phone && slots[slot][0] != 0 {
        slot = (slot + 1) & mask;
    }
    slot
}

/// Where `phone`'s probe starts: the dedup table's hash spreads the digits,
/// whose low bits alone would cluster.
#[inline]
fn home(slots: &[Slot], phone: u64) -> usize {
    home_of(phone, slots.len())
}

/// The home slot of `phone` in a table of `slots` slots (a power of two):
/// shared with the joint table (`joint.rs`), so both place phones alike.
#[inline]
pub(super) fn home_of(phone: u64, slots: usize) -> usize {
    crate::dedup::hash(phone) as usize & (slots - 1)
}

impl Default for PhoneTable {
    fn default() -> Self {
        PhoneTable::with_capacity(0)
    }
}

impl PhoneTable {
    /// A table that holds `n` phones without growing.
    pub fn with_capacity(n: usize) -> PhoneTable {
        let slots = (n + n / 3 + 1).next_power_of_two().max(8);
        PhoneTable {
            slots: Words::Owned(empty_words(slots * 2)),
            len: 0,
        }
    }

    /// The table of `pairs` (a later pair replaces an earlier one's hash).
    pub fn from_pairs(pairs: &[(u64, u64)]) -> PhoneTable {
        let mut table = PhoneTable::with_capacity(pairs.len());
        for (i, &(phone, hash)) in pairs.iter().enumerate() {
            // Inserts land at random slots: fetch a few ahead, as lookups do.
            if let Some(&(ahead, _)) = pairs.get(i + PREFETCH_AHEAD) {
                table.prefetch(ahead);
            }
            table.insert(phone, hash);
        }
        table
    }

    /// The table whose slots are mapped from a file, holding `phones`
    /// phones. The caller vouches for the slots: `snapshot.rs` checks that
    /// the file is the one a build with this [`layout_fingerprint`] wrote
    /// (its checksum), so only the shape is checked here, not every slot —
    /// a walk that cost 45 ms of CPU per re-run (perf, issue 11).
    pub fn from_mapped(words: MappedWords, phones: usize) -> Option<PhoneTable> {
        let n = words.count / 2;
        let whole = words.count.is_multiple_of(2);
        (whole && n.is_power_of_two() && n >= 8 && phones * 4 <= n * 3).then_some(PhoneTable {
            slots: Words::Mapped(words),
            len: phones,
        })
    }

    /// The slots, `[0, 0]` where empty: what a snapshot file holds.
    pub fn slots(&self) -> &[Slot] {
        self.slots.as_chunks::<2>().0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets `phone`'s hash. Phone 0 is not a number and is ignored.
    pub fn insert(&mut self, phone: u64, hash: u64) {
        if phone == 0 {
            return;
        }
        if (self.len + 1) * 4 > self.slots().len() * 3 {
            self.grow();
        }
        let slot = self.find(phone);
        if self.slots()[slot][0] == 0 {
            self.len += 1;
        }
        self.owned()[slot] = [phone, hash];
    }

    /// The slots, to change: a mapped table is copied into memory first.
    fn owned(&mut self) -> &mut [Slot] {
        self.slots.owned_mut().as_chunks_mut::<2>().0
    }

    /// `phone`'s hash, if it is in the table. Inlined into the merger's loop:
    /// its perf samples and the merger's on a re-run fell from ≈ 660 to
    /// ≈ 350 (3 runs each, builds without LTO; BENCHMARKS.md "Fifth pass").
    #[inline]
    pub fn get(&self, phone: u64) -> Option<u64> {
        let slots = self.slots();
        let [key, hash] = slots[find(slots, phone)];
        (key == phone && phone != 0).then_some(hash)
    }

    /// Starts loading the cache line `phone`'s probe begins at, so that a
    /// lookup a few rows later finds it there. Only a hint: it changes nothing.
    pub fn prefetch(&self, phone: u64) {
        let slots = self.slots();
        prefetch_line(&slots[home(slots, phone)]);
    }

    /// The slot holding `phone`, or the empty slot where it would go.
    fn find(&self, phone: u64) -> usize {
        find(self.slots(), phone)
    }

    fn grow(&mut self) {
        let doubled = Words::Owned(empty_words(self.slots.len() * 2));
        let old = std::mem::replace(&mut self.slots, doubled);
        self.len = 0;
        for &[phone, hash] in old.as_chunks::<2>().0.iter().filter(|[p, _]| *p != 0) {
            let slot = self.find(phone);
            self.owned()[slot] = [phone, hash];
            self.len += 1;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The `VmFlags` of the mapping holding address `inside`, from
    /// `/proc/self/smaps`; `None` where the kernel has no transparent huge
    /// pages or shows no mapping flags (nothing to check there).
    #[cfg(target_os = "linux")]
    pub(in crate::state) fn vm_flags_at(inside: usize) -> Option<Vec<String>> {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            return None;
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        if !smaps.contains("VmFlags:") {
            return None;
        }
        let mut in_mapping = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                in_mapping = (start..end).contains(&inside);
            } else if in_mapping && let Some(rest) = line.strip_prefix("VmFlags:") {
                return Some(rest.split_whitespace().map(str::to_owned).collect());
            }
        }
        panic!("no mapping holds {inside:#x} in /proc/self/smaps");
    }

    /// A table's slots are advised huge pages (`hg` in the mapping's `VmFlags`).
    #[cfg(target_os = "linux")]
    #[test]
    fn large_tables_ask_for_huge_pages() {
        let words = empty_words(2 << 20);
        if let Some(flags) = vm_flags_at(words.as_ptr() as usize + (8 << 20)) {
            assert!(flags.iter().any(|f| f == "hg"), "VmFlags: {flags:?}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// The table answers like a `HashMap` fed the same pairs, through growth.
        #[test]
        fn answers_like_a_hash_map(
            pairs in proptest::collection::vec((0u64..5000, any::<u64>()), 0..3000),
            probes in proptest::collection::vec(0u64..6000, 0..200),
        ) {
            let mut grown = PhoneTable::default();
            let mut map = std::collections::HashMap::new();
            for &(phone, hash) in &pairs {
                grown.insert(phone, hash);
                if phone != 0 {
                    map.insert(phone, hash);
                }
            }
            let built = PhoneTable::from_pairs(&pairs);
            for table in [&grown, &built] {
                prop_assert_eq!(table.len(), map.len());
                for phone in probes.iter().chain(map.keys()) {
                    table.prefetch(*phone);
                    prop_assert_eq!(table.get(*phone), map.get(phone).copied());
                }
            }
        }
    }

    /// A table mapped from a file answers as the table it was written from,
    /// and a change copies it into memory first, leaving the file as it was.
    #[test]
    fn a_mapped_table_reads_in_place_and_copies_itself_to_change() {
        let pairs: Vec<_> = (1..=1000u64).map(|p| (p * 7919, p)).collect();
        let table = PhoneTable::from_pairs(&pairs);
        let mut bytes = vec![0u8; 16];
        for [phone, hash] in table.slots() {
            bytes.extend_from_slice(&phone.to_le_bytes());
            bytes.extend_from_slice(&hash.to_le_bytes());
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        // SAFETY: a private mapping of a file this test alone holds.
        let map = || unsafe { memmap2::Mmap::map(file.as_file()).unwrap() };
        let count = table.slots().len();
        assert!(
            MappedWords::new(map(), 16, 2 * count + 1).is_none(),
            "past the end"
        );
        assert!(
            MappedWords::new(map(), 12, 2 * count).is_none(),
            "misaligned"
        );
        let shaped = |phones| {
            PhoneTable::from_mapped(MappedWords::new(map(), 16, 2 * count).unwrap(), phones)
        };
        assert!(shaped(count).is_none(), "more than 3/4 full");
        assert!(
            MappedWords::new(map(), 16, 2 * count - 2)
                .and_then(|m| PhoneTable::from_mapped(m, 1))
                .is_none(),
            "not a power of two"
        );
        let mut mapped = shaped(table.len()).expect("its own slots");
        assert_eq!(mapped.len(), 1000);
        assert!(matches!(mapped.slots, Words::Mapped(_)));
        assert_eq!(mapped.slots(), table.slots());
        assert_eq!(mapped.get(7919 * 500), Some(500));
        mapped.insert(7919 * 500, 42);
        mapped.insert(3, 4);
        assert!(matches!(mapped.slots, Words::Owned(_)));
        assert_eq!((mapped.get(7919 * 500), mapped.get(3)), (Some(42), Some(4)));
        assert_eq!(
            std::fs::read(file.path()).unwrap(),
            bytes,
            "the file is unchanged"
        );
    }

    /// A snapshot trusts that phones sit where this build would put them. If
    /// this test fails, phones now sit elsewhere: change the value here AND
    /// `MAGIC` in snapshot.rs, or a re-run would miss every phone in an older
    /// snapshot (and send everything again). Also pins linear probing: the
    /// second of two phones with one home takes the next slot.
    #[test]
    fn the_layout_fingerprint_is_pinned() {
        assert_eq!(layout_fingerprint(), 0xc6b1_f41f_aaa1_f4ec);
        let slots = [[0u64, 0]; 8];
        let first = (1u64..).find(|&p| home(&slots, p) == 7).unwrap();
        let second = (first + 1..).find(|&p| home(&slots, p) == 7).unwrap();
        let table = PhoneTable::from_pairs(&[(first, 1), (second, 2)]);
        let at = |p: u64| table.slots().iter().position(|s| s[0] == p);
        let n = table.slots().len();
        assert_eq!(n, 8);
        assert_eq!(
            (at(first), at(second)),
            (Some(7), Some(0)),
            "wraps to the next slot"
        );
    }

    #[test]
    fn stays_within_16_bytes_per_slot_at_most_three_quarters_full() {
        for n in [0usize, 1, 5, 6, 7, 1000, 775_689] {
            let table = PhoneTable::with_capacity(n);
            assert!(
                n * 4 <= table.slots().len() * 3,
                "{n} phones overfill {}",
                table.slots().len()
            );
            assert!(
                table.slots().len() <= (2 * n).max(8) * 2,
                "{n} phones get {} slots",
                table.slots().len()
            );
        }
    }
}
