//! One module per page.

pub mod blend;
pub mod compare;
pub mod dataset_versions;
pub mod deployments;
pub mod experiments;
pub mod generate;
pub mod negatives;
pub mod overview;
pub mod styles;
pub mod train;

/// Percent-encodes a query value (UTF-8, everything but unreserved characters).
pub(crate) fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
