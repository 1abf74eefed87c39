//! The state's in-memory index: phone → payload hash, built once at start and
//! then only read, by every row of every sink of a re-run.
//!
//! Hand-written (open addressing, linear probing, one array of pairs) instead
//! of a `HashMap` for two measured reasons (perf on a 1M-row re-run, issue 11):
//! - a lookup in a table far larger than the cache costs one trip to memory
//!   per cache line it touches. hashbrown touches two (its control bytes and
//!   its buckets are separate arrays); this table one, as a key and its hash
//!   sit together and probes run along the same line;
//! - the merger knows which phones come next, so it can ask for their lines
//!   ahead ([`PhoneTable::prefetch`]), which no map crate offers.
//!
//! Memory: 16 bytes per slot at a load between 3/8 and 3/4, like hashbrown.

/// How many pairs ahead [`PhoneTable::from_pairs`] prefetches.
const PREFETCH_AHEAD: usize = 8;

/// Phone digits (never 0: an E.164 number starts with a country code) → hash.
#[derive(Debug, Clone)]
pub struct PhoneTable {
    /// `(phone, hash)`; phone 0 marks an empty slot.
    slots: Box<[(u64, u64)]>,
    len: usize,
}

/// `n` empty slots, in memory the kernel is asked to back with 2 MiB pages.
///
/// A re-run looks each row up in three tables of 16 MiB: 4,096 small pages
/// each, far more than the TLB holds, so lookups pay page walks on top of
/// their cache misses (2 MiB pages: −18% of the merger thread's perf samples
/// on a 1M-row re-run, BENCHMARKS.md "Fourth pass"). This machine's
/// kernel gives huge pages only to memory that asks (`transparent_hugepage`
/// = `madvise`, the common default), so ask: `madvise(MADV_HUGEPAGE)` on the
/// 2 MiB-aligned part of the fresh, still untouched allocation. Only advice:
/// where it is refused or unknown, the table works the same on small pages.
pub fn empty_slots(n: usize) -> Box<[(u64, u64)]> {
    let slots = vec![(0u64, 0u64); n].into_boxed_slice();
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = slots.as_ptr() as usize;
        let end = start + std::mem::size_of_val(&*slots);
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last > first {
            // SAFETY: [first, last) lies inside `slots`, which this function
            // owns; MADV_HUGEPAGE changes how pages are backed, never their
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
    slots
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
            slots: empty_slots(slots),
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

    /// The table whose slots are `slots` (as [`PhoneTable::slots`] gave them),
    /// if they are one: a power-of-two count at most 3/4 full, and every phone
    /// where its probe finds it — checked in one pass, so that slots laid out
    /// by another build (another hash) are never trusted.
    pub fn from_slots(slots: Box<[(u64, u64)]>) -> Option<PhoneTable> {
        let n = slots.len();
        if !n.is_power_of_two() || n < 8 {
            return None;
        }
        let mask = n - 1;
        let mut table = PhoneTable { slots, len: 0 };
        // Walk once around from an empty slot: a phone is found iff no empty
        // slot lies between its home and its place.
        let empty = table.slots.iter().position(|(phone, _)| *phone == 0)?;
        let mut run_start = empty + 1;
        for step in 1..=n {
            let i = (empty + step) & mask;
            let phone = table.slots[i].0;
            if phone == 0 {
                run_start = i + 1;
            } else if (i.wrapping_sub(table.home(phone)) & mask)
                > (i.wrapping_sub(run_start) & mask)
            {
                return None;
            } else {
                table.len += 1;
            }
        }
        (table.len * 4 <= n * 3).then_some(table)
    }

    /// The slots, `(0, 0)` where empty: what [`PhoneTable::from_slots`] takes back.
    pub fn slots(&self) -> &[(u64, u64)] {
        &self.slots
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
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let slot = self.find(phone);
        if self.slots[slot].0 == 0 {
            self.len += 1;
        }
        self.slots[slot] = (phone, hash);
    }

    /// `phone`'s hash, if it is in the table.
    pub fn get(&self, phone: u64) -> Option<u64> {
        let (key, hash) = self.slots[self.find(phone)];
        (key == phone && phone != 0).then_some(hash)
    }

    /// Starts loading the cache line `phone`'s probe begins at, so that a
    /// lookup a few rows later finds it there. Only a hint: it changes nothing.
    pub fn prefetch(&self, phone: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let slot = &self.slots[self.home(phone)];
            // SAFETY: a prefetch is a hint; it never faults, and the address is in bounds.
            unsafe { _mm_prefetch::<_MM_HINT_T0>((slot as *const (u64, u64)).cast::<i8>()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = phone;
    }

    /// The slot holding `phone`, or the empty slot where it would go.
    fn find(&self, phone: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut slot = self.home(phone);
        // The table is never full (load ≤ 3/4), so an empty slot ends every probe.
        while self.slots[slot].0 != phone && self.slots[slot].0 != 0 {
            slot = (slot + 1) & mask;
        }
        slot
    }

    /// Where `phone`'s probe starts: the dedup table's hash spreads the
    /// digits, whose low bits alone would cluster.
    fn home(&self, phone: u64) -> usize {
        crate::dedup::hash(phone) as usize & (self.slots.len() - 1)
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = empty_slots(old.len() * 2);
        self.len = 0;
        for (phone, hash) in old.iter().copied().filter(|&(p, _)| p != 0) {
            let slot = self.find(phone);
            self.slots[slot] = (phone, hash);
            self.len += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table's slots are advised huge pages (`hg` in the mapping's
    /// `VmFlags`); a kernel without transparent huge pages, or one that shows
    /// no mapping flags, has nothing to check.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_tables_ask_for_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            return;
        }
        let slots = empty_slots(1 << 20);
        let inside = slots.as_ptr() as usize + (8 << 20);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        if !smaps.contains("VmFlags:") {
            return; // A kernel (or sandbox) that does not show mapping flags.
        }
        let mut in_mapping = false;
        let mut flags = None;
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
                flags = Some(rest.to_owned());
            }
        }
        let flags = flags.expect("the table's mapping is in /proc/self/smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "VmFlags:{flags}"
        );
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

    proptest! {
        /// Slots read back are the same table; slots moved out of their probe
        /// (as another hash function would place them) are refused.
        #[test]
        fn from_slots_takes_back_its_own_slots_only(
            phones in proptest::collection::hash_set(1u64..u64::MAX, 1..500),
            shift in 1usize..7,
        ) {
            let pairs: Vec<_> = phones.iter().map(|&p| (p, p ^ 7)).collect();
            let table = PhoneTable::from_pairs(&pairs);
            let back = PhoneTable::from_slots(table.slots().into()).expect("its own slots");
            prop_assert_eq!(back.len(), table.len());
            for &(phone, hash) in &pairs {
                prop_assert_eq!(back.get(phone), Some(hash));
            }
            let mut moved = table.slots().to_vec();
            moved.rotate_left(shift);
            if let Some(moved) = PhoneTable::from_slots(moved.into()) {
                // Accepted only if every phone is still found where it now sits.
                for &(phone, hash) in &pairs {
                    prop_assert_eq!(moved.get(phone), Some(hash));
                }
            }
        }
    }

    #[test]
    fn from_slots_refuses_what_is_not_a_table() {
        assert!(
            PhoneTable::from_slots(vec![(0, 0); 12].into()).is_none(),
            "not a power of two"
        );
        assert!(
            PhoneTable::from_slots(vec![(1, 0); 8].into()).is_none(),
            "full"
        );
        // 5 sits at a slot its probe never reaches (an empty slot before it).
        let home = PhoneTable::default().home(5);
        let mut slots = vec![(0, 0); 8];
        slots[(home + 2) & 7] = (5, 1);
        assert!(PhoneTable::from_slots(slots.into()).is_none());
    }

    #[test]
    fn stays_within_16_bytes_per_slot_at_most_three_quarters_full() {
        for n in [0usize, 1, 5, 6, 7, 1000, 775_689] {
            let table = PhoneTable::with_capacity(n);
            assert!(
                n * 4 <= table.slots.len() * 3,
                "{n} phones overfill {}",
                table.slots.len()
            );
            assert!(
                table.slots.len() <= (2 * n).max(8) * 2,
                "{n} phones get {} slots",
                table.slots.len()
            );
        }
    }
}
