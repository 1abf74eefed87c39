//! Adding upserted contacts to the configured groups without touching their
//! other memberships: `POST contact_actions.json {"action": "add"}` with up to
//! [`BATCH`] contact UUIDs (API.md §1.5b), paced by `actions_rate` on a limiter
//! of its own, because the API counts these in its `v2` bucket, apart from the
//! upserts' `v2.contacts`.
//!
//! The API validates the whole request before it changes anything and names
//! the contacts it refuses (`No such object: …`, `Non-active contacts cannot
//! be added to groups: …`): those are dropped and the rest sent again. A
//! refused contact keeps its upsert status (`created`/`updated`) with the
//! reason in `detail`, and is not recorded as delivered, so the next run tries
//! again. A row is reported — and recorded — only once all its adds are done.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;

use super::WeniConfig;
use crate::config::SinkCommon;
use crate::report::Status;
use crate::sink::ItemMeta;
use crate::sink::http::{Ended, Finished, Uploader};
use crate::sink::lane::Lane;

/// Contacts per `contact_actions` request (the API's limit).
pub const BATCH: usize = 100;

/// A contact the upsert accepted, waiting for its group adds.
pub struct Upserted {
    pub meta: ItemMeta,
    /// `created` or `updated`.
    pub status: Status,
    /// The upsert's outcome (its attempts and HTTP status go in the report).
    pub finished: Finished,
    /// The contact's UUID from the upsert's answer (the URN is used without one).
    pub uuid: Option<String>,
}

/// What became of one contact's adds.
enum Added {
    /// The platform refused this contact (blocked, stopped…): upsert status kept.
    Refused(String),
    /// The request failed for the whole batch.
    Failed(Finished, String),
}

/// The task that batches upserted contacts and adds them to every group.
pub struct Adder {
    config: WeniConfig,
    lane: Arc<Lane>,
    uploader: Result<Uploader, String>,
}

impl Adder {
    pub fn new(config: &WeniConfig, lane: &Arc<Lane>) -> Adder {
        let common = SinkCommon {
            rate: config.actions_rate,
            concurrency: 1,
            ..config.common.clone()
        };
        let uploader = Uploader::new(lane.kind, &common, true, lane.shutdown.clone())
            .map_err(|e| e.to_string());
        Adder {
            config: config.clone(),
            lane: lane.clone(),
            uploader,
        }
    }

    /// Sends whatever has been upserted (up to [`BATCH`]) as soon as the
    /// previous request is done: batches grow by themselves when the adds lag
    /// behind the upserts, and no contact waits for a batch to fill — a stop
    /// (time limit, signal) leaves as few contacts as possible upserted but
    /// not yet added (those are `skipped` and completed by the next run).
    pub async fn run(self, mut rx: mpsc::Receiver<Upserted>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.flush(batch).await;
        }
    }

    /// Adds a batch to every group, then reports each contact.
    async fn flush(&self, batch: Vec<Upserted>) {
        if batch.is_empty() {
            return;
        }
        if self.lane.shutdown.is_stopping() {
            // Upserted but not in its groups yet: not delivered, so `skipped`
            // with the stop's own detail (the report's http_status shows the
            // upsert's answer); the next run upserts again and adds.
            let ids: Vec<ItemMeta> = batch.into_iter().map(|u| u.meta).collect();
            self.lane.report_not_sent(ids);
            return;
        }
        let mut outcomes: Vec<Option<Added>> = batch.iter().map(|_| None).collect();
        for group in &self.config.groups {
            self.add_to_group(group, &batch, &mut outcomes).await;
        }
        for (u, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                None => self
                    .lane
                    .report_finished(vec![u.meta], &u.finished, u.status),
                Some(Added::Refused(detail)) => {
                    self.lane
                        .report(vec![u.meta], u.status, Some(&u.finished), &detail)
                }
                Some(Added::Failed(finished, detail)) => {
                    let status = match finished.ended {
                        Ended::Rejected(_) | Ended::AuthRefused(_) => Status::Rejected,
                        Ended::Skipped(_) => Status::Skipped,
                        _ => Status::Failed,
                    };
                    self.lane
                        .report(vec![u.meta], status, Some(&finished), &detail)
                }
            }
        }
    }

    /// Adds the batch's contacts not refused so far to `group`; a 400 that
    /// names contacts drops them and sends the rest again.
    async fn add_to_group(&self, group: &str, batch: &[Upserted], outcomes: &mut [Option<Added>]) {
        let mut left: Vec<usize> = (0..batch.len())
            .filter(|&i| outcomes[i].is_none())
            .collect();
        while !left.is_empty() {
            let references: Vec<String> = left.iter().map(|&i| reference(&batch[i])).collect();
            let finished = self.post(group, &references).await;
            let body = String::from_utf8_lossy(&finished.body).into_owned();
            let named: Vec<usize> = match (&finished.ended, finished.http_status) {
                (Ended::Success, _) => return,
                (Ended::Rejected(_), Some(400)) => left
                    .iter()
                    .copied()
                    .filter(|&i| names(&body, &reference(&batch[i])))
                    .collect(),
                _ => Vec::new(),
            };
            if named.is_empty() {
                let why = super::describe(&finished.ended);
                for &i in &left {
                    // A stop before the add keeps the stop's own detail (`time limit reached`).
                    let detail = match &finished.ended {
                        Ended::Skipped(reason) => reason.clone(),
                        _ => format!(
                            "upserted ({}), but adding to group \"{group}\" failed: {why}",
                            batch[i].status.name()
                        ),
                    };
                    outcomes[i] = Some(Added::Failed(finished.clone(), detail));
                }
                return;
            }
            let why = super::describe(&finished.ended);
            for &i in &named {
                outcomes[i] = Some(Added::Refused(format!(
                    "not added to group \"{group}\": {why}"
                )));
            }
            left.retain(|i| !named.contains(i));
        }
    }

    async fn post(&self, group: &str, contacts: &[String]) -> Finished {
        let uploader = match &self.uploader {
            Ok(u) => u,
            Err(e) => {
                return Finished {
                    ended: Ended::Failed(format!("cannot start the HTTP client: {e}")),
                    http_status: None,
                    attempts: 0,
                    body: Default::default(),
                };
            }
        };
        let url = format!(
            "{}/api/v2/contact_actions.json",
            self.config.common.base_url
        );
        let body = json!({"contacts": contacts, "action": "add", "group": group});
        let auth = self.lane.secret(&format!("Token {}", self.lane.token));
        uploader
            .execute(
                |client| {
                    client
                        .post(&url)
                        .header("authorization", auth.clone())
                        .json(&body)
                },
                |_, _| None,
            )
            .await
    }
}

/// How the contact is named in `contact_actions`: its UUID, else its URN.
fn reference(u: &Upserted) -> String {
    u.uuid
        .clone()
        .unwrap_or_else(|| format!("whatsapp:{}", u.meta.phone.0))
}

/// Whether an error body names `reference` as a whole word (a UUID or URN,
/// never a prefix of a longer one).
fn names(body: &str, reference: &str) -> bool {
    body.split(|c: char| c.is_whitespace() || matches!(c, ',' | '"' | '[' | ']' | '{' | '}'))
        .any(|word| word == reference)
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn a_refusal_names_whole_references_only() {
        let body =
            r#"{"contacts": ["Non-active contacts cannot be added to groups: 1a-2b, 3c-4d"]}"#;
        assert!(names(body, "1a-2b"));
        assert!(names(body, "3c-4d"));
        assert!(!names(body, "1a"));
        let body = r#"{"contacts": ["No such object: whatsapp:551196000000"]}"#;
        assert!(names(body, "whatsapp:551196000000"));
        assert!(!names(body, "whatsapp:55119600000"));
    }
}
