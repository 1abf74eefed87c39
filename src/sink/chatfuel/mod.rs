//! Chatfuel: up to 1,000 phones per request, all sharing one property set.
//!
//! Rows are grouped by their property set (static `properties` + per-row
//! `property_columns`, empty values omitted); each group is cut into batches
//! of `batch_size`, and open batches are flushed at the end of input — or
//! earlier, the fullest first, when open batches hold [`MAX_OPEN_PHONES`]
//! phones, so a high-cardinality property column cannot grow memory.
//! Re-posting a phone sets the same properties again, so retries are safe.

mod config;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;

pub use config::ChatfuelConfig;

use super::http::{Ended, Finished};
use super::lane::{Lane, worker_pool};
use super::{
    Check, Delivery, GroupCounts, ItemMeta, ParseContext, Payload, PlanCounts, Platform, RowView,
    Sink, SinkKind,
};
use crate::config::{ColumnUse, ConfigError};
use crate::phone::E164;
use crate::report::Status;
use crate::sandbox::SandboxOptions;
use crate::state::{PayloadHasher, Scope};

/// The registry entry.
pub const PLATFORM: Platform = Platform {
    name: "chatfuel",
    parse,
};

/// Phones held in open (not yet full) batches before the fullest is sent early.
pub const MAX_OPEN_PHONES: usize = 20_000;

fn parse(
    value: toml::Value,
    kind: SinkKind,
    ctx: &ParseContext<'_>,
) -> Result<Box<dyn Sink>, ConfigError> {
    let config = config::parse(value, kind, ctx)?;
    let mut static_hash = PayloadHasher::default();
    for (prop, value) in &config.properties {
        static_hash.add(prop.as_bytes()).add(value.as_bytes());
    }
    static_hash.add(b"--per-row--");
    Ok(Box::new(Chatfuel {
        kind,
        config,
        static_hash,
    }))
}

/// The Chatfuel sink.
#[derive(Debug)]
pub struct Chatfuel {
    kind: SinkKind,
    pub config: ChatfuelConfig,
    /// The hasher after the static properties, which every row shares: hashed
    /// once instead of per row.
    static_hash: PayloadHasher,
}

impl Sink for Chatfuel {
    crate::sink_accessors!();

    fn column_uses(&self) -> Vec<ColumnUse> {
        self.config
            .property_columns
            .iter()
            .map(|(prop, column)| ColumnUse {
                column: column.clone(),
                key: format!("sinks.chatfuel.property_columns.{prop}"),
            })
            .collect()
    }

    fn bind(&mut self, index_of: &dyn Fn(&str) -> usize) {
        self.config.bound_property_columns = self
            .config
            .property_columns
            .iter()
            .map(|(prop, column)| (prop.clone(), index_of(column)))
            .collect();
    }

    /// Rows with equal property sets share batches; the group is a stable hash
    /// of the whole set, which is also the row's payload hash for the state.
    fn check(&self, row: RowView<'_>, _phone: E164, _hash: bool) -> Check {
        let mut hasher = self.static_hash;
        for (prop, value) in row_properties(&self.config.bound_property_columns, row) {
            hasher.add(prop.as_bytes()).add(value.as_bytes());
        }
        let hash = hasher.finish();
        Check::Ready { group: hash, hash }
    }

    fn build(&self, row: RowView<'_>, _phone: E164, group: u64) -> Payload {
        Payload::Grouped {
            group,
            properties: properties(&self.config, row),
        }
    }

    fn state_scope(&self) -> Scope {
        Scope {
            sink: "chatfuel",
            scope: format!(
                "{} {}",
                self.config.common.base_url, self.config.automation_id
            ),
            legacy: self.config.automation_id.clone(),
        }
    }

    fn plan(&self, _rows: u64, groups: &GroupCounts) -> PlanCounts {
        let batch = self.config.batch_size as u64;
        PlanCounts {
            requests: groups.values().map(|n| n.div_ceil(batch)).sum(),
            prepare_requests: 0,
            note: format!(
                " in {} property set(s)",
                crate::progress::thousands(groups.len() as u64)
            ),
            secondary: None,
        }
    }

    fn requests_for(&self, rows: u64) -> u64 {
        rows.div_ceil(self.config.batch_size as u64)
    }

    fn configure_sandbox(&self, options: &mut SandboxOptions) {
        options
            .chatfuel_automations
            .push(self.config.automation_id.clone());
    }

    fn deliver(self: Arc<Self>, lane: Arc<Lane>) -> Delivery {
        Box::pin(run(self, lane))
    }
}

/// The row's per-row properties (empty values omitted: they never clear data).
fn row_properties<'a>(
    columns: &'a [(String, usize)],
    row: RowView<'a>,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    columns.iter().filter_map(move |(prop, index)| {
        let value = crate::record::trim(row.cell(*index));
        (!value.is_empty()).then_some((prop.as_str(), value))
    })
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
    /// Records in open batches, and the most allowed before the fullest is released.
    open_items: usize,
    max_open: usize,
}

impl<T> Batcher<T> {
    pub fn new(batch_size: usize, max_open: usize) -> Batcher<T> {
        Batcher {
            batch_size: batch_size.max(1),
            open: HashMap::new(),
            open_items: 0,
            max_open: max_open.max(1),
        }
    }

    /// Adds a record of `group`; returns a batch to send now: the group's when it
    /// is full, or the fullest open one when open batches hold `max_open` records.
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
        self.open_items += 1;
        let release = if batch.items.len() >= size {
            Some(group)
        } else if self.open_items >= self.max_open {
            self.open
                .iter()
                .max_by_key(|(g, b)| (b.items.len(), std::cmp::Reverse(**g)))
                .map(|(g, _)| *g)
        } else {
            None
        };
        let batch = self.open.remove(&release?)?;
        self.open_items -= batch.items.len();
        Some(batch)
    }

    /// End of input: every open batch, in a stable order (by group).
    pub fn finish(self) -> Vec<Batch<T>> {
        let mut rest: Vec<(u64, Batch<T>)> = self.open.into_iter().collect();
        rest.sort_by_key(|(group, _)| *group);
        rest.into_iter().map(|(_, b)| b).collect()
    }
}

/// Groups the lane's rows into batches and sends them with `concurrency` workers.
async fn run(sink: Arc<Chatfuel>, lane: Arc<Lane>) {
    let concurrency = sink.config.common.concurrency;
    let mut rx = lane.receiver(concurrency * 2);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch<ItemMeta>>(concurrency * 2);
    let (for_workers, lane_for_workers) = (sink.clone(), lane.clone());
    let workers = tokio::spawn(worker_pool(concurrency, batch_rx, move |batch| {
        let (sink, lane) = (for_workers.clone(), lane_for_workers.clone());
        async move { send(&sink, &lane, batch).await }
    }));
    let mut batcher = Batcher::new(sink.config.batch_size, MAX_OPEN_PHONES);
    while let Some(item) = rx.recv().await {
        let Payload::Grouped { group, properties } = item.payload else {
            continue;
        };
        if let Some(ready) = batcher.push(group, properties, item.meta)
            && let Err(lost) = batch_tx.send(ready).await
        {
            lane.report_not_sent(lost.0.items);
        }
    }
    for batch in batcher.finish() {
        if let Err(lost) = batch_tx.send(batch).await {
            lane.report_not_sent(lost.0.items);
        }
    }
    drop(batch_tx);
    let _ = workers.await;
}

async fn send(sink: &Chatfuel, lane: &Lane, batch: Batch<ItemMeta>) {
    if lane.shutdown.is_stopping() {
        lane.report_not_sent(batch.items);
        return;
    }
    send_or_split(sink, lane, batch.properties, batch.items).await;
}

/// Sends one batch; when Chatfuel refuses a batch of several phones (a 4xx
/// other than 401/403/404/429: one bad phone fails the whole batch), sends
/// each half again, recursively, until the refused phones are isolated
/// (SPEC "Chatfuel split retries"). With k refused phones in a batch of b,
/// that is at most 2·k·⌈log2 b⌉ extra requests.
fn send_or_split<'a>(
    sink: &'a Chatfuel,
    lane: &'a Lane,
    properties: Vec<(String, String)>,
    mut items: Vec<ItemMeta>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        let finished = post(sink, lane, &properties, &items).await;
        let splittable = matches!(finished.ended, Ended::Rejected(_))
            && items.len() > 1
            && finished
                .http_status
                .is_some_and(|s| (400..500).contains(&s) && ![401, 403, 404, 429].contains(&s));
        if !splittable {
            lane.report_finished(items, &finished, Status::Sent);
            return;
        }
        let second = items.split_off(items.len() / 2);
        send_or_split(sink, lane, properties.clone(), items).await;
        send_or_split(sink, lane, properties, second).await;
    })
}

/// One request for `items`, all with `properties`.
async fn post(
    sink: &Chatfuel,
    lane: &Lane,
    properties: &[(String, String)],
    items: &[ItemMeta],
) -> Finished {
    let config = &sink.config;
    let url = format!(
        "{}/api/contacts/{}/whatsapp/",
        config.common.base_url, config.automation_id
    );
    let phones: Vec<String> = items.iter().map(|m| m.phone.to_string()).collect();
    let properties: serde_json::Map<String, serde_json::Value> = properties
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    let body = json!({"phones": phones, "contact_data": {"properties": properties}});
    lane.uploader
        .execute(
            |client| client.post(&url).bearer_auth(&lane.token).json(&body),
            |_, _| None,
        )
        .await
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
            let mut batcher = Batcher::new(batch_size, usize::MAX);
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

        /// With a cap on open records, no more than the cap is ever held, and
        /// every record still lands in exactly one single-group batch.
        #[test]
        fn open_batches_never_hold_more_than_the_cap(
            groups in proptest::collection::vec(0u64..500, 0..2000),
            max_open in 1usize..100,
        ) {
            let mut batcher = Batcher::new(1000, max_open);
            let mut batched = 0;
            for (i, g) in groups.iter().enumerate() {
                if let Some(b) = batcher.push(*g, Vec::new(), (i, *g)) {
                    prop_assert!(b.items.iter().all(|(_, x)| x == g || b.items[0].1 == *x));
                    batched += b.items.len();
                }
                prop_assert!(batcher.open_items < max_open);
                prop_assert_eq!(batcher.open.values().map(|b| b.items.len()).sum::<usize>(), batcher.open_items);
            }
            batched += batcher.finish().iter().map(|b| b.items.len()).sum::<usize>();
            prop_assert_eq!(batched, groups.len());
        }
    }
}
