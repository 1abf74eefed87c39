//! Weni (RapidPro): one upsert per contact, keyed by its URN.

use super::{Check, RowView};
use crate::config::{UrnScheme, WeniConfig, WeniMode};
use crate::phone::{E164, weni_digit_count_ok};

/// The URN of a number in the configured scheme (API.md §1.3.1).
pub fn urn(scheme: UrnScheme, phone: E164) -> String {
    match scheme {
        UrnScheme::Whatsapp => format!("whatsapp:{}", phone.0),
        UrnScheme::Tel => format!("tel:{phone}"),
    }
}

/// Weni's own rules that libphonenumber does not know: 8–15 digits, name ≤ 100
/// characters, a 3-letter language code.
pub fn check(config: &WeniConfig, row: RowView<'_>, phone: E164) -> Check {
    if !weni_digit_count_ok(phone) {
        return Check::Rejected(
            format!(
                "Weni needs 8 to 15 digits; {phone} has {}",
                phone.digit_count()
            )
            .into(),
        );
    }
    if config.mode == WeniMode::Delete {
        return Check::Ready { group: 0 };
    }
    if let Some(name) = &config.name
        && let Some(name) = name.render(|i| row.cell(i))
        && name.chars().count() > 100
    {
        return Check::Rejected("Contact name cannot exceed 100 characters.".into());
    }
    if let Some(language) = &config.language
        && let Some(language) = language.render(|i| row.cell(i))
        && !(language.len() == 3 && language.bytes().all(|b| b.is_ascii_lowercase()))
    {
        return Check::Rejected(
            format!("Not a valid ISO639-3 language code: \"{language}\".").into(),
        );
    }
    Check::Ready { group: 0 }
}
