//! Chatfuel: up to 1,000 phones per request, all sharing one property set.

use std::hash::{Hash, Hasher};

use super::{Check, RowView};
use crate::config::ChatfuelConfig;

/// Property columns bound to projected-column indices (set by the pipeline).
pub fn property_column_indices(
    config: &ChatfuelConfig,
    index_of: &dyn Fn(&str) -> usize,
) -> Vec<(String, usize)> {
    config
        .property_columns
        .iter()
        .map(|(prop, column)| (prop.clone(), index_of(column)))
        .collect()
}

/// The row's per-row properties (empty values omitted: they never clear data).
pub fn row_properties<'a>(
    columns: &'a [(String, usize)],
    row: RowView<'a>,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    columns.iter().filter_map(move |(prop, index)| {
        let value = row.cell(*index).trim();
        (!value.is_empty()).then_some((prop.as_str(), value))
    })
}

/// Rows with equal property sets share batches; the group is a hash of the set.
pub fn check(config: &ChatfuelConfig, row: RowView<'_>) -> Check {
    let columns = &config.bound_property_columns;
    if columns.is_empty() {
        return Check::Ready { group: 0 };
    }
    // std's SipHash with fixed keys: deterministic across threads and runs.
    let mut hasher = std::hash::DefaultHasher::new();
    for (prop, value) in row_properties(columns, row) {
        prop.hash(&mut hasher);
        value.hash(&mut hasher);
    }
    Check::Ready {
        group: hasher.finish(),
    }
}
