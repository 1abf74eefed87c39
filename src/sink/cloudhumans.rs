//! CloudHumans (CloudChat): one proactive WhatsApp template message per phone.

use super::{Check, RowView};
use crate::config::CloudHumansConfig;

/// The only per-row rule the API documents beyond E.164: `header_attachment`
/// must be an http(s) URL of at most 2,000 characters.
pub fn check(config: &CloudHumansConfig, row: RowView<'_>) -> Check {
    if let Some(header) = &config.header_attachment
        && let Some(url) = header.render(|i| row.cell(i))
        && (!(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2000)
    {
        return Check::Rejected(
            "header_attachment must be an http(s) URL of at most 2000 characters".into(),
        );
    }
    Check::Ready { group: 0 }
}
