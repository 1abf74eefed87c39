//! Buffers handed back by the stage that is done with them to the stage that
//! fills the next one: a chunk's rows from the render workers to the reader,
//! its checks to the normalizers, its report bytes from the report thread to
//! the render workers.
//!
//! Why not just free and allocate: each of those buffers is hundreds of KB,
//! allocated on one thread and freed on another. glibc then hands the freed
//! memory back to the kernel (`MADV_DONTNEED` when an arena's top grows past
//! its trim threshold) and the next chunk faults the same pages in again,
//! zeroed. On a 1M-row re-run that was 36–49k page faults, a large part of
//! the 10–15% of its CPU time spent in the kernel (perf `-e page-faults`: ¾
//! of them writing report bytes, most of the rest reading rows; BENCHMARKS.md,
//! "Tenth pass"). A recycled buffer keeps its pages and the capacity it grew to.
//!
//! A [`Recycler`] is bounded: a buffer handed back to a full one is freed, so
//! it never holds more than its few idle buffers beyond what the pipeline's
//! bounded channels already hold.

use crossbeam_channel::{Receiver, Sender, bounded};

/// A bounded stock of idle buffers, shared by the threads that hand them back
/// and the threads that take them.
pub struct Recycler<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
}

impl<T> Clone for Recycler<T> {
    fn clone(&self) -> Self {
        Recycler {
            tx: self.tx.clone(),
            rx: self.rx.clone(),
        }
    }
}

impl<T> Recycler<T> {
    /// A stock of at most `idle` buffers.
    pub fn new(idle: usize) -> Recycler<T> {
        let (tx, rx) = bounded(idle);
        Recycler { tx, rx }
    }

    /// An idle buffer as it was handed back (the taker empties it), if any.
    pub fn take(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// Hands a buffer back; freed at once if the stock is full.
    pub fn give(&self, buffer: T) {
        let _ = self.tx.try_send(buffer);
    }
}

impl<T> Recycler<Vec<T>> {
    /// An idle vector emptied, or a new one.
    pub fn take_empty(&self) -> Vec<T> {
        let mut buffer = self.take().unwrap_or_default();
        buffer.clear();
        buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_handed_back_comes_back_empty_with_its_capacity() {
        let recycler = Recycler::<Vec<u8>>::new(2);
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(b"rows of the last chunk");
        let address = bytes.as_ptr();
        recycler.give(bytes);
        let again = recycler.take_empty();
        assert!(again.is_empty());
        assert_eq!(
            again.as_ptr(),
            address,
            "the same allocation, not a new one"
        );
        assert!(again.capacity() >= 4096);
        assert_eq!(recycler.take_empty().capacity(), 0, "then a new one");
    }

    #[test]
    fn a_full_recycler_frees_what_is_handed_back() {
        let recycler = Recycler::<Vec<u8>>::new(2);
        for n in 1..=3u8 {
            recycler.give(vec![n]);
        }
        assert_eq!(recycler.take(), Some(vec![1]));
        assert_eq!(recycler.take(), Some(vec![2]));
        assert_eq!(recycler.take(), None, "the third was freed, not kept");
    }
}
