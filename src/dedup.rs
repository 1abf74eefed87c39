//! First-wins dedup of E.164 numbers across every input of a run.
//!
//! Memory is the one thing that grows with the input, so each entry is packed
//! into 12 bytes (`[u32; 3]`): the number (≤ 17 digits → 57 bits) and the
//! global ordinal of its first row (39 bits, 5.5 × 10¹¹ rows). With
//! hashbrown's one control byte per bucket and its worst load right after a
//! resize (7/16), that is at most 13 × 16 / 7 ≈ 29.7 bytes per unique phone,
//! and ≈ 15–26 bytes typically — under SPEC's 32. Ordinals map back to
//! `(source, row)` through the small per-source table in [`Dedup`].
//!
//! A single table doubles in one step, holding old and new buckets at once:
//! right after 1M phones that transient is 1.5× the table (≈ 20 MB for 13).
//! So the set is split into [`SHARDS`] tables by hash bits, each growing on
//! its own: a resize then costs 1/64 of the set, and peak memory follows the
//! number of phones instead of jumping at each power of two.

use hashbrown::HashTable;

use crate::phone::E164;
use crate::record::Position;

const PHONE_BITS: u32 = 57;
const ORDINAL_BITS: u32 = 39;
/// Tables the set is split into (see the module comment).
const SHARDS: usize = 64;

/// The shard of a hash. Bits 40–45: hashbrown indexes buckets with the low
/// bits and tags them with the top 7, so a shard must take neither.
fn shard_of(h: u64) -> usize {
    (h >> 40) as usize % SHARDS
}

/// splitmix64's finalizer: a cheap, well-mixed hash for integer keys (the
/// state's phone table uses it too).
pub fn hash(phone: u64) -> u64 {
    let mut z = phone.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One packed entry: phone in the low 57 bits of (a, b), ordinal in the rest.
#[derive(Clone, Copy)]
struct Entry([u32; 3]);

impl Entry {
    fn new(phone: u64, ordinal: u64) -> Entry {
        let high = (phone >> 32) as u32 | (((ordinal >> 32) as u32) << (PHONE_BITS - 32));
        Entry([phone as u32, high, ordinal as u32])
    }

    fn phone(self) -> u64 {
        let mask = (1u64 << PHONE_BITS) - 1;
        ((self.0[1] as u64) << 32 | self.0[0] as u64) & mask
    }

    fn ordinal(self) -> u64 {
        ((self.0[1] >> (PHONE_BITS - 32)) as u64) << 32 | self.0[2] as u64
    }
}

/// The set of numbers seen so far in this run.
pub struct Dedup {
    shards: Vec<HashTable<Entry>>,
    /// The phones the state's joint table holds, deduped by their slot there.
    known: KnownSlots,
    /// Global ordinal of each source's first row (sources in run order).
    source_starts: Vec<u64>,
    /// Next global ordinal to hand out.
    next_ordinal: u64,
    current_source: Option<u32>,
}

/// Phones a re-run's state already holds, by their slot in its joint table
/// ([`crate::state::JointTable`]): a bit per slot for "seen this run", which
/// stays in the L2 cache (128 KB for a million slots), and the ordinal of the
/// phone's first row, written once and read back only for a duplicate. Why:
/// on a re-run every row's phone is looked up in the joint table anyway, and
/// a second random probe per row into a hash set of every phone was the
/// re-run's one cost that grows with cache pressure (issue 11, eighth pass).
#[derive(Default)]
struct KnownSlots {
    seen: Vec<u64>,
    first: Vec<u64>,
    len: usize,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup::new()
    }
}

impl Dedup {
    pub fn new() -> Dedup {
        Dedup {
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
            known: KnownSlots::default(),
            source_starts: Vec::new(),
            next_ordinal: 0,
            current_source: None,
        }
    }

    /// Lets [`Dedup::check_known`] dedup the phones of a joint table of
    /// `slots` slots by slot. Call it before any of them is checked.
    pub fn know_slots(&mut self, slots: usize) {
        self.known = KnownSlots {
            seen: vec![0; slots.div_ceil(64)],
            first: vec![0; slots],
            len: 0,
        };
    }

    /// [`Dedup::check`] for a phone the joint table holds at `slot`: a phone
    /// must always come with the same slot, or always without one.
    pub fn check_known(&mut self, slot: usize, phone: E164, at: Position) -> Option<Position> {
        if slot >= self.known.first.len() {
            return self.check(phone, at);
        }
        let ordinal = self.ordinal_of(at);
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if self.known.seen[word] & bit != 0 {
            return Some(self.position_of(self.known.first[slot]));
        }
        self.known.seen[word] |= bit;
        self.known.first[slot] = ordinal;
        self.known.len += 1;
        None
    }

    /// Records `phone` seen at `at` (rows must come in input order). Returns
    /// `None` if it is new, or where it was first seen. Always inlined: it
    /// runs once per row on the merger thread, and with a second caller
    /// ([`Dedup::check_known`]) LTO had stopped inlining it, which cost the
    /// stateless dry run 2% (alternated runs, issue 11's eighth pass).
    #[inline(always)]
    pub fn check(&mut self, phone: E164, at: Position) -> Option<Position> {
        debug_assert!(
            phone.0 < 1 << PHONE_BITS,
            "E.164 numbers have at most 17 digits"
        );
        let ordinal = self.ordinal_of(at);
        let h = hash(phone.0);
        let table = &mut self.shards[shard_of(h)];
        if let Some(first) = table.find(h, |e| e.phone() == phone.0) {
            let first = first.ordinal();
            return Some(self.position_of(first));
        }
        table.insert_unique(h, Entry::new(phone.0, ordinal), |e| hash(e.phone()));
        None
    }

    /// Looks every phone of `phones` up and forgets the answers, so that
    /// their buckets are in the cache when [`Dedup::check`] comes: in a tight
    /// loop the CPU has many of these independent misses in flight at once,
    /// where `check`, one per row between other work, waits for each.
    pub fn warm(&self, phones: impl Iterator<Item = E164>) {
        for phone in phones {
            let h = hash(phone.0);
            let found = self.shards[shard_of(h)].find(h, |e| e.phone() == phone.0);
            std::hint::black_box(found.is_some());
        }
    }

    /// The run-wide ordinal of the row at `at`.
    fn ordinal_of(&mut self, at: Position) -> u64 {
        if self.current_source != Some(at.source) {
            // Sources arrive in order; a new one starts its ordinals after the last row handed out.
            while self.source_starts.len() <= at.source as usize {
                self.source_starts.push(self.next_ordinal);
            }
            self.current_source = Some(at.source);
        }
        let start = self.source_starts[at.source as usize];
        let ordinal = start + at.row - 1;
        self.next_ordinal = self.next_ordinal.max(ordinal + 1);
        debug_assert!(ordinal < 1 << ORDINAL_BITS);
        ordinal
    }

    fn position_of(&self, ordinal: u64) -> Position {
        let source = self
            .source_starts
            .partition_point(|&s| s <= ordinal)
            .saturating_sub(1);
        Position {
            source: source as u32,
            row: ordinal - self.source_starts[source] + 1,
        }
    }

    /// Number of unique phones.
    pub fn len(&self) -> usize {
        self.known.len + self.shards.iter().map(HashTable::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the tables hold (buckets and control bytes).
    #[cfg(test)]
    fn allocated_bytes(&self) -> usize {
        self.shards.iter().map(HashTable::allocation_size).sum()
    }

    /// Bytes allocated at the worst moment of the next insert: one shard
    /// holding its old and its doubled buckets while it resizes.
    #[cfg(test)]
    fn peak_bytes_of_next_insert(&self) -> usize {
        let largest_resize = self
            .shards
            .iter()
            .filter(|t| t.len() == t.capacity())
            .map(|t| 2 * t.allocation_size())
            .max()
            .unwrap_or(0);
        self.allocated_bytes() + largest_resize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(source: u32, row: u64) -> Position {
        Position { source, row }
    }

    #[test]
    fn first_wins_across_sources() {
        let mut d = Dedup::new();
        assert_eq!(d.check(E164(5511987654321), at(0, 1)), None);
        assert_eq!(d.check(E164(5511987654322), at(0, 2)), None);
        assert_eq!(d.check(E164(5511987654321), at(0, 3)), Some(at(0, 1)));
        assert_eq!(d.check(E164(5511987654322), at(1, 1)), Some(at(0, 2)));
        assert_eq!(d.check(E164(14155550100), at(2, 7)), None);
        assert_eq!(d.check(E164(14155550100), at(2, 9)), Some(at(2, 7)));
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn entry_is_twelve_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 12);
    }

    /// Regression for the RSS growth of issue 11 (53 B per unique phone): one
    /// table doubling at once cost 1.5× its size at the peak.
    #[test]
    fn memory_per_unique_phone_stays_under_32_bytes_while_growing() {
        let mut d = Dedup::new();
        let mut worst = 0f64;
        for i in 1..=600_000u64 {
            let phone = 5_511_900_000_000 + i * 7919 % 99_999_999;
            d.check(E164(phone), at(0, i));
            if i >= 50_000 && i % 1000 == 0 {
                let per_phone = d.peak_bytes_of_next_insert() as f64 / d.len() as f64;
                worst = worst.max(per_phone);
            }
        }
        assert_eq!(d.len(), 600_000);
        assert!(
            worst <= 32.0,
            "{worst:.1} bytes per unique phone at the peak"
        );
    }

    proptest! {
        #[test]
        fn packing_round_trips(phone in 0u64..(1 << PHONE_BITS), ordinal in 0u64..(1 << ORDINAL_BITS)) {
            let e = Entry::new(phone, ordinal);
            prop_assert_eq!(e.phone(), phone);
            prop_assert_eq!(e.ordinal(), ordinal);
        }

        /// Phones with a slot (as the state's joint table gives them) and
        /// phones without one, mixed and across sources, get the answers the
        /// hash set alone gives, and the same count.
        #[test]
        fn known_slots_agree_with_the_hash_set(
            rows in proptest::collection::vec((0u64..60, 0u32..3), 1..300),
            slots in 1usize..40,
        ) {
            // An even phone p is known at slot p / 2 (one slot per phone, as
            // a table gives; past `slots` it falls back to the set), an odd
            // one is not known.
            let slot_of = |p: u64| p.is_multiple_of(2).then_some(p as usize / 2);
            let (mut plain, mut mixed) = (Dedup::new(), Dedup::new());
            mixed.know_slots(slots);
            let mut rows = rows;
            rows.sort_by_key(|&(_, source)| source);
            for (i, &(p, source)) in rows.iter().enumerate() {
                let position = at(source, i as u64 + 1);
                let phone = E164(5_511_900_000_000 + p);
                let expected = plain.check(phone, position);
                let got = match slot_of(p) {
                    Some(slot) => mixed.check_known(slot, phone, position),
                    None => mixed.check(phone, position),
                };
                prop_assert_eq!(got, expected);
            }
            prop_assert_eq!(mixed.len(), plain.len());
        }

        #[test]
        fn agrees_with_a_hashmap(phones in proptest::collection::vec(0u64..50, 1..200)) {
            let mut d = Dedup::new();
            let mut reference = std::collections::HashMap::new();
            for (i, p) in phones.iter().enumerate() {
                let row = i as u64 + 1;
                let expected = reference.get(p).copied();
                reference.entry(*p).or_insert(row);
                let got = d.check(E164(*p), at(0, row)).map(|pos| pos.row);
                prop_assert_eq!(got, expected);
            }
        }
    }
}
