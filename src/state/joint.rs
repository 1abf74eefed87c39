//! The joint index: for each phone, what every scope of a run delivered to
//! it, in one slot — so a re-run decides a row with one lookup, not one per sink.
//!
//! Why: a re-run's three per-scope tables (16 MB each) are far larger than
//! the cache and spread over 12,288 small pages of a mapped file, so each
//! lookup paid a cache miss and a page walk, three per row: ≈ 550 perf
//! samples of a 1M-row re-run (0.14 s of CPU), the largest cost a re-run has
//! that a dry run has not (BENCHMARKS.md "Seventh pass"). Here a phone's key
//! and its hashes share one cache line.
//!
//! A slot is `stride` words: the key, then one hash per column (a scope, in
//! the run's sink order), padded to a power of two so that a slot never
//! straddles two cache lines. The key holds the phone in its low 50 bits (an
//! E.164 number has at most 15 digits, < 2^50) and, above them, one bit per
//! column that has a hash for the phone: a scope may know a phone another
//! does not, and any hash value, 0 included, is a valid hash.
//!
//! Phones are placed as in [`PhoneTable`]: home slot from `dedup::hash`,
//! then linear probing; an all-zero key is an empty slot.

use super::PhoneTable;
use super::index::{MappedWords, Words, empty_words, home_of, prefetch_line};

/// Bits of a key that hold the phone.
const PHONE_BITS: u32 = 50;
const PHONE_MASK: u64 = (1 << PHONE_BITS) - 1;
/// Columns a joint table can have: one presence bit each above the phone.
pub const MAX_COLUMNS: usize = (u64::BITS - PHONE_BITS) as usize;

/// Phone → each column's hash, in one slot.
#[derive(Debug)]
pub struct JointTable {
    words: Words,
    columns: usize,
    /// Words per slot: `columns + 1`, rounded up to a power of two.
    stride: usize,
    /// Phones held.
    len: usize,
}

/// What a joint table holds for one phone.
#[derive(Clone, Copy, Debug)]
pub struct JointRow<'a> {
    key: u64,
    hashes: &'a [u64],
    slot: usize,
}

impl JointRow<'_> {
    /// The phone's slot: its own for the table's life (see `Dedup::check_known`).
    #[inline]
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The hash `column`'s scope last delivered, if it delivered to this phone.
    #[inline]
    pub fn delivered(&self, column: usize) -> Option<u64> {
        let present = column < MAX_COLUMNS && (self.key >> (PHONE_BITS as usize + column)) & 1 == 1;
        present.then(|| self.hashes[column])
    }
}

impl JointTable {
    /// Words per slot for `columns` columns.
    pub fn stride_for(columns: usize) -> usize {
        (columns + 1).next_power_of_two()
    }

    /// The joint table of `tables` (column `c` from `tables[c]`), or `None`
    /// for fewer than two tables (nothing to join) or more than [`MAX_COLUMNS`].
    /// Tests only: the run's end fills a column at a time instead, with one
    /// member's table mapped at once (`snapshot/joint.rs`).
    #[cfg(test)]
    pub fn from_tables(tables: &[&PhoneTable]) -> Option<JointTable> {
        let largest = tables.iter().map(|t| t.len()).max().unwrap_or(0);
        let mut joint = JointTable::with_capacity(tables.len(), largest)?;
        for (column, table) in tables.iter().enumerate() {
            joint.fill_column(column, table);
        }
        Some(joint)
    }

    /// An empty table of `columns` columns (2 to [`MAX_COLUMNS`]) sized for
    /// `phones` phones; it grows past them. Filled a column at a time
    /// ([`JointTable::fill_column`]), so that only one scope's table need be
    /// in memory beside it.
    pub fn with_capacity(columns: usize, phones: usize) -> Option<JointTable> {
        (2..=MAX_COLUMNS)
            .contains(&columns)
            .then(|| JointTable::empty(columns, slots_for(phones)))
    }

    /// Sets `column`'s hashes from `table`.
    pub fn fill_column(&mut self, column: usize, table: &PhoneTable) {
        for &[phone, hash] in table.slots().iter().filter(|[p, _]| *p != 0) {
            self.insert(phone, column, hash);
        }
    }

    /// The table whose words are mapped from a file, holding `phones`
    /// phones in `columns` columns. As for [`PhoneTable::from_mapped`], the
    /// caller vouches for the words (`snapshot.rs` checks the file's
    /// checksum); only the shape is checked here.
    pub fn from_mapped(words: MappedWords, columns: usize, phones: usize) -> Option<JointTable> {
        if !(1..=MAX_COLUMNS).contains(&columns) {
            return None;
        }
        let stride = JointTable::stride_for(columns);
        let count = words.words().len();
        let slots = count / stride;
        let shaped = count.is_multiple_of(stride) && slots.is_power_of_two() && slots >= 8;
        (shaped && phones * 4 <= slots * 3).then_some(JointTable {
            words: Words::Mapped(words),
            columns,
            stride,
            len: phones,
        })
    }

    fn empty(columns: usize, slots: usize) -> JointTable {
        let stride = JointTable::stride_for(columns);
        JointTable {
            words: Words::Owned(empty_words(slots * stride)),
            columns,
            stride,
            len: 0,
        }
    }

    /// The words, slot after slot: what a snapshot file holds.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Phones held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn slot_count(&self) -> usize {
        self.words.len() / self.stride
    }

    /// The first word of the slot holding `phone`, or of the empty slot where it would go.
    #[inline]
    fn find(&self, phone: u64) -> usize {
        let words: &[u64] = &self.words;
        let (stride, mask) = (self.stride, self.slot_count() - 1);
        let mut slot = home_of(phone, mask + 1);
        // Never full (load ≤ 3/4): an empty slot ends every probe.
        loop {
            let key = words[slot * stride];
            if key & PHONE_MASK == phone || key == 0 {
                return slot * stride;
            }
            slot = (slot + 1) & mask;
        }
    }

    /// What the table holds for `phone`, if anything.
    #[inline]
    pub fn get(&self, phone: u64) -> Option<JointRow<'_>> {
        if phone == 0 || phone > PHONE_MASK {
            return None;
        }
        let at = self.find(phone);
        let key = self.words[at];
        (key != 0).then(|| JointRow {
            key,
            hashes: &self.words[at + 1..at + 1 + self.columns],
            slot: at / self.stride,
        })
    }

    /// Starts loading the cache line `phone`'s probe begins at (see [`PhoneTable::prefetch`]).
    pub fn prefetch(&self, phone: u64) {
        let slot = home_of(phone, self.slot_count());
        if let Some(word) = self.words.get(slot * self.stride) {
            prefetch_line(word);
        }
    }

    /// Records `hash` for `phone` in `column`. A phone that does not fit the
    /// key (0, or more than 15 digits: never an E.164 number) is ignored; the
    /// state then simply does not know it, and the row is sent.
    fn insert(&mut self, phone: u64, column: usize, hash: u64) {
        if phone == 0 || phone > PHONE_MASK || column >= self.columns {
            return;
        }
        if (self.len + 1) * 4 > self.slot_count() * 3 {
            self.grow();
        }
        let at = self.find(phone);
        let words = self.words.owned_mut();
        if words[at] == 0 {
            words[at] = phone;
            self.len += 1;
        }
        words[at] |= 1 << (PHONE_BITS as usize + column);
        words[at + 1 + column] = hash;
    }

    fn grow(&mut self) {
        let mut bigger = JointTable::empty(self.columns, self.slot_count() * 2);
        for slot in self.words.chunks_exact(self.stride).filter(|s| s[0] != 0) {
            let at = bigger.find(slot[0] & PHONE_MASK);
            bigger.words.owned_mut()[at..at + self.stride].copy_from_slice(slot);
            bigger.len += 1;
        }
        *self = bigger;
    }
}

/// Slots for `n` phones at a load of at most 3/4, as [`PhoneTable::with_capacity`].
fn slots_for(n: usize) -> usize {
    (n + n / 3 + 1).next_power_of_two().max(8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The joint table answers, for every column, as that column's own table.
        #[test]
        fn answers_as_each_scopes_own_table(
            columns in proptest::collection::vec(
                proptest::collection::vec((1u64..3000, any::<u64>()), 0..2000), 2..5),
            probes in proptest::collection::vec(0u64..3500, 0..200),
        ) {
            let tables: Vec<PhoneTable> = columns.iter().map(|p| PhoneTable::from_pairs(p)).collect();
            let refs: Vec<&PhoneTable> = tables.iter().collect();
            let joint = JointTable::from_tables(&refs).expect("2 to 4 columns");
            let mut union: Vec<u64> = columns.iter().flatten().map(|&(p, _)| p).collect();
            union.sort_unstable();
            union.dedup();
            prop_assert_eq!(joint.len(), union.len());
            for phone in probes.iter().chain(&union) {
                joint.prefetch(*phone);
                let row = joint.get(*phone);
                for (c, table) in tables.iter().enumerate() {
                    prop_assert_eq!(row.and_then(|r| r.delivered(c)), table.get(*phone));
                }
            }
        }
    }

    #[test]
    fn a_phone_one_scope_lacks_has_no_hash_there_even_a_zero_one() {
        let one = PhoneTable::from_pairs(&[(5511987654321, 0), (14155550123, 7)]);
        let two = PhoneTable::from_pairs(&[(14155550123, 9)]);
        let joint = JointTable::from_tables(&[&one, &two]).unwrap();
        let row = joint.get(5511987654321).expect("known to the first scope");
        assert_eq!((row.delivered(0), row.delivered(1)), (Some(0), None));
        let row = joint.get(14155550123).unwrap();
        assert_eq!((row.delivered(0), row.delivered(1)), (Some(7), Some(9)));
        assert!(joint.get(447911123456).is_none());
        assert!(joint.get(0).is_none() && joint.get(u64::MAX).is_none());
        assert!(
            JointTable::from_tables(&[&one]).is_none(),
            "one table: nothing to join"
        );
    }

    #[test]
    fn slots_are_a_power_of_two_words_and_grow_past_three_quarters() {
        assert_eq!(JointTable::stride_for(1), 2);
        assert_eq!(JointTable::stride_for(3), 4);
        assert_eq!(JointTable::stride_for(4), 8);
        // Disjoint scopes: the union outgrows the size of the largest one.
        let pairs = |offset: u64| {
            (1..=600u64)
                .map(|p| (p * 7 + offset, p))
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (
            PhoneTable::from_pairs(&pairs(1)),
            PhoneTable::from_pairs(&pairs(2)),
            PhoneTable::from_pairs(&pairs(3)),
        );
        let joint = JointTable::from_tables(&[&a, &b, &c]).unwrap();
        assert_eq!(joint.len(), 1800);
        assert!(joint.len() * 4 <= joint.slot_count() * 3);
        assert_eq!(joint.words().len(), joint.slot_count() * 4);
        assert_eq!(joint.get(7 * 600 + 3).unwrap().delivered(2), Some(600));
    }
}
