//! The platforms: turning a record into requests.
//!
//! For now this is the part the dry run needs — per row and sink, whether the
//! request can be built and what the platform's own rules would say about it
//! ([`Check`]), and for Chatfuel which batch group the row falls in. Sending
//! comes on top of the same functions, so a dry run validates exactly what a
//! real run would send.

use crate::config::SinkConfig;
use crate::phone::E164;
use crate::record::Chunk;

pub mod chatfuel;
pub mod cloudhumans;
pub mod weni;

/// What a sink would do with a row, decided before any request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The request can be built. `group` is Chatfuel's property-set hash (0 elsewhere):
    /// rows with equal groups share batches.
    Ready { group: u64 },
    /// The platform would refuse it by its own rules (e.g. Weni's 8–15 digits): `rejected`.
    Rejected(Box<str>),
    /// Not attempted (e.g. past `max_messages`): `skipped`.
    Skipped(Box<str>),
}

/// A row of a chunk, for building requests.
#[derive(Clone, Copy)]
pub struct RowView<'a> {
    pub chunk: &'a Chunk,
    pub index: usize,
}

impl<'a> RowView<'a> {
    /// Value of projected column `column`.
    pub fn cell(&self, column: usize) -> &'a str {
        self.chunk.cell(self.index, column)
    }
}

/// Checks `row` (with its normalized `phone`) against `sink`'s request rules.
pub fn check(sink: &SinkConfig, row: RowView<'_>, phone: E164) -> Check {
    match sink {
        SinkConfig::Chatfuel(c) => chatfuel::check(c, row),
        SinkConfig::Weni(c) => weni::check(c, row, phone),
        SinkConfig::CloudHumans(c) => cloudhumans::check(c, row),
    }
}
