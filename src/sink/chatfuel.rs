//! Chatfuel: up to 1,000 phones per request, all sharing one property set.
//!
//! Rows are grouped by their property set (static `properties` + per-row
//! `property_columns`, empty values omitted); each group is cut into batches
//! of `batch_size`, and open batches are flushed at the end of input.
//! Re-posting a phone sets the same properties again, so retries are safe.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;

use super::{Check, ItemMeta, Payload, RowView, SinkItem, SinkRuntime};
use crate::config::{ChatfuelConfig, SinkConfig};
use crate::report::Status;
use crate::state::PayloadHasher;

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
fn row_properties<'a>(
    columns: &'a [(String, usize)],
    row: RowView<'a>,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    columns.iter().filter_map(move |(prop, index)| {
        let value = row.cell(*index).trim();
        (!value.is_empty()).then_some((prop.as_str(), value))
    })
}

/// Rows with equal property sets share batches; the group is a stable hash of
/// the whole set, which is also the row's payload hash for the state.
pub fn check(config: &ChatfuelConfig, row: RowView<'_>) -> Check {
    let mut hasher = PayloadHasher::default();
    for (prop, value) in &config.properties {
        hasher.add(prop.as_bytes()).add(value.as_bytes());
    }
    hasher.add(b"--per-row--");
    for (prop, value) in row_properties(&config.bound_property_columns, row) {
        hasher.add(prop.as_bytes()).add(value.as_bytes());
    }
    let hash = hasher.finish();
    Check::Ready { group: hash, hash }
}

/// The full property set of a row: static properties, then per-row ones.
pub fn properties(config: &ChatfuelConfig, row: RowView<'_>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = config
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(
        row_properties(&config.bound_property_columns, row)
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    out
}

/// A batch ready to send: one property set, at most `batch_size` records.
#[derive(Debug)]
pub struct Batch<T> {
    pub properties: Vec<(String, String)>,
    pub items: Vec<T>,
}

/// Groups records by property set and cuts each group into batches of at most
/// `batch_size`. Pure, so the batching rules are tested alone (see the proptest).
pub struct Batcher<T> {
    batch_size: usize,
    open: HashMap<u64, Batch<T>>,
}

impl<T> Batcher<T> {
    pub fn new(batch_size: usize) -> Batcher<T> {
        Batcher {
            batch_size: batch_size.max(1),
            open: HashMap::new(),
        }
    }

    /// Adds a record of `group`; returns the group's batch when it is full.
    pub fn push(
        &mut self,
        group: u64,
        properties: Vec<(String, String)>,
        item: T,
    ) -> Option<Batch<T>> {
        let size = self.batch_size;
        let batch = self.open.entry(group).or_insert_with(|| Batch {
            properties,
            items: Vec::with_capacity(size.min(1024)),
        });
        batch.items.push(item);
        if batch.items.len() >= size {
            self.open.remove(&group)
        } else {
            None
        }
    }

    /// End of input: every open batch, in a stable order (by group).
    pub fn finish(self) -> Vec<Batch<T>> {
        let mut rest: Vec<(u64, Batch<T>)> = self.open.into_iter().collect();
        rest.sort_by_key(|(group, _)| *group);
        rest.into_iter().map(|(_, b)| b).collect()
    }
}

/// Groups items into batches and sends them with `concurrency` workers.
pub async fn run(sink: Arc<SinkRuntime>, mut rx: mpsc::Receiver<SinkItem>) {
    let SinkConfig::Chatfuel(config) = &sink.config else {
        return;
    };
    let concurrency = config.common.concurrency;
    let (batch_tx, batch_rx) = mpsc::channel::<Batch<ItemMeta>>(concurrency * 2);
    let sender = sink.clone();
    let workers = tokio::spawn(super::worker_pool(concurrency, batch_rx, move |batch| {
        let sink = sender.clone();
        async move { send(&sink, batch).await }
    }));
    let mut batcher = Batcher::new(config.batch_size);
    while let Some(item) = rx.recv().await {
        let Payload::Chatfuel { group, properties } = item.payload else {
            continue;
        };
        if let Some(full) = batcher.push(group, properties, item.meta)
            && batch_tx.send(full).await.is_err()
        {
            break;
        }
    }
    for batch in batcher.finish() {
        if batch_tx.send(batch).await.is_err() {
            break;
        }
    }
    drop(batch_tx);
    let _ = workers.await;
}

async fn send(sink: &SinkRuntime, batch: Batch<ItemMeta>) {
    let SinkConfig::Chatfuel(config) = &sink.config else {
        return;
    };
    if sink.interrupted() {
        sink.report_interrupted(batch.items);
        return;
    }
    let url = format!(
        "{}/api/contacts/{}/whatsapp/",
        config.common.base_url, config.automation_id
    );
    let phones: Vec<String> = batch.items.iter().map(|m| m.phone.to_string()).collect();
    let properties: serde_json::Map<String, serde_json::Value> = batch
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    let body = json!({"phones": phones, "contact_data": {"properties": properties}});
    let finished = sink
        .uploader
        .execute(
            |client| client.post(&url).bearer_auth(&sink.token).json(&body),
            |_| None,
        )
        .await;
    sink.report_finished(batch.items, &finished, Status::Sent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every record lands in exactly one batch, each batch holds one group
        /// and at most `batch_size` records, and each group needs ceil(n/size) batches.
        #[test]
        fn batches_partition_records_by_group(
            groups in proptest::collection::vec(0u64..5, 0..400),
            batch_size in 1usize..50,
        ) {
            let mut batcher = Batcher::new(batch_size);
            let mut batches = Vec::new();
            for (i, g) in groups.iter().enumerate() {
                let props = vec![("plan".to_string(), g.to_string())];
                if let Some(full) = batcher.push(*g, props, (i, *g)) {
                    batches.push(full);
                }
            }
            batches.extend(batcher.finish());
            let mut seen = vec![false; groups.len()];
            let mut per_group: HashMap<u64, usize> = HashMap::new();
            for batch in &batches {
                prop_assert!(!batch.items.is_empty() && batch.items.len() <= batch_size);
                let g = batch.items[0].1;
                prop_assert_eq!(&batch.properties[0].1, &g.to_string());
                for &(i, group) in &batch.items {
                    prop_assert_eq!(group, g, "a batch mixes property sets");
                    prop_assert!(!seen[i], "record {} in two batches", i);
                    seen[i] = true;
                }
                *per_group.entry(g).or_insert(0) += 1;
            }
            prop_assert!(seen.iter().all(|s| *s), "every record is batched");
            for (g, count) in per_group {
                let n = groups.iter().filter(|x| **x == g).count();
                prop_assert_eq!(count, n.div_ceil(batch_size));
            }
        }
    }
}
