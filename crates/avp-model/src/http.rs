//! The HTTP client of every download (weights and the hub), in one place.

use std::time::Duration;

/// An agent with bounded waits that returns HTTP error statuses rather
/// than raising them.
pub(crate) fn agent(read_timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(15)))
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_per_read(Some(read_timeout))
        .http_status_as_error(false)
        .build()
        .into()
}
