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

/// A batch ready to send.
struct Batch {
    properties: Vec<(String, String)>,
    metas: Vec<ItemMeta>,
}

/// Groups items into batches and sends them with `concurrency` workers.
pub async fn run(sink: Arc<SinkRuntime>, mut rx: mpsc::Receiver<SinkItem>) {
    let SinkConfig::Chatfuel(config) = &sink.config else {
        return;
    };
    let batch_size = config.batch_size;
    let concurrency = config.common.concurrency;
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(concurrency * 2);
    let sender = sink.clone();
    let workers = tokio::spawn(super::worker_pool(
        concurrency,
        batch_rx,
        move |batch: Batch| {
            let sink = sender.clone();
            async move { send(&sink, batch).await }
        },
    ));
    let mut open: HashMap<u64, Batch> = HashMap::new();
    while let Some(item) = rx.recv().await {
        let Payload::Chatfuel { group, properties } = item.payload else {
            continue;
        };
        let batch = open.entry(group).or_insert_with(|| Batch {
            properties,
            metas: Vec::with_capacity(batch_size),
        });
        batch.metas.push(item.meta);
        if batch.metas.len() >= batch_size
            && let Some(full) = open.remove(&group)
            && batch_tx.send(full).await.is_err()
        {
            break;
        }
    }
    // End of input: flush every open batch, in a stable order.
    let mut rest: Vec<(u64, Batch)> = open.into_iter().collect();
    rest.sort_by_key(|(group, _)| *group);
    for (_, batch) in rest {
        if batch_tx.send(batch).await.is_err() {
            break;
        }
    }
    drop(batch_tx);
    let _ = workers.await;
}

async fn send(sink: &SinkRuntime, batch: Batch) {
    let SinkConfig::Chatfuel(config) = &sink.config else {
        return;
    };
    if sink.interrupted() {
        sink.report_interrupted(batch.metas);
        return;
    }
    let url = format!(
        "{}/api/contacts/{}/whatsapp/",
        config.common.base_url, config.automation_id
    );
    let phones: Vec<String> = batch.metas.iter().map(|m| m.phone.to_string()).collect();
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
    sink.report_finished(batch.metas, &finished, Status::Sent);
}
