//! Quarantine: mail a plugin held at acceptance (`message.quarantine`). It
//! waits in the spool in the `quarantine` state until an operator releases
//! it (`postern queue release`: delivered as if it had passed, its age for
//! `max_age` starting again) or deletes it. It is never tried and never
//! bounced; past `[delivery] quarantine_retention` after its arrival the
//! sweep here removes it, without a bounce, as Exchange's quarantine does.

use std::path::Path;
use std::time::Duration;

use super::state::{self, unix_now};
use super::Delivery;
use crate::queue::{self, QueueId};

/// How often the sweep looks: a tenth of the retention, between a second
/// (tests set retentions of seconds) and an hour.
fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// The quarantined messages that arrived at least `retention` before `now`.
pub fn expired(queue_dir: &Path, retention: Duration, now: u64) -> Vec<QueueId> {
    let Ok(ids) = queue::list_ids(queue_dir) else {
        return Vec::new();
    };
    ids.into_iter()
        .filter(|id| {
            // The envelope line only: the message bytes are not read.
            let Ok(stored) = queue::spool_load(&queue_dir.join(id.as_str()), id) else {
                return false;
            };
            let meta = stored.meta;
            let st = state::load(queue_dir, &meta, id)
                .unwrap_or_else(|_| state::DeliveryState::new(&meta));
            st.is_quarantined(&meta) && now.saturating_sub(meta.received) >= retention.as_secs()
        })
        .collect()
}

/// Removes expired quarantined mail every [`interval`], for as long as the
/// relay runs.
pub async fn sweep(delivery: Delivery, retention: Duration) {
    let every = interval(retention);
    loop {
        tokio::time::sleep(every).await;
        let dir = delivery.queue_dir().to_path_buf();
        let found = tokio::task::spawn_blocking(move || expired(&dir, retention, unix_now())).await;
        for id in found.unwrap_or_default() {
            match delivery.delete(&id).await {
                Ok(()) => tracing::info!(queue_id = %id, retention = ?retention,
                    "quarantined message removed after its retention"),
                Err(queue::Error::NotFound(_)) => {}
                Err(e) => tracing::warn!(queue_id = %id, error = %e,
                    "cannot remove a quarantined message past its retention"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_interval_follows_the_retention() {
        for (retention, every) in [(3, 1), (10, 1), (60, 6), (30 * 86400, 3600)] {
            assert_eq!(
                interval(Duration::from_secs(retention)),
                Duration::from_secs(every),
                "{retention}"
            );
        }
    }
}
