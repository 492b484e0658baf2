//! Limits messages and recipients per client address (or network), AUTH
//! user, sender domain and recipient domain, in fixed windows counted in the
//! granted kv store: relays that share a Redis share the counts. See
//! README.md.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use postern_sdk::kv;
use postern_sdk::prelude::*;

/// What a limit counts by.
#[derive(serde::Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum By {
    Client,
    AuthUser,
    SenderDomain,
    RecipientDomain,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitConfig {
    by: By,
    #[serde(default)]
    messages: Option<u64>,
    #[serde(default)]
    recipients: Option<u64>,
    per: String,
    /// With `by = "client"`: count by network instead of address.
    #[serde(default)]
    prefix_v4: Option<u8>,
    #[serde(default)]
    prefix_v6: Option<u8>,
}

#[derive(serde::Deserialize, Default, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "snake_case")]
enum OnUnavailable {
    /// Let the mail through and log a line.
    #[default]
    Open,
    /// 451 4.7.1 until the store answers again.
    Tempfail,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RatelimitConfig {
    limits: Vec<LimitConfig>,
    #[serde(default)]
    on_unavailable: OnUnavailable,
}

#[derive(Debug, Clone, PartialEq)]
struct Limit {
    by: By,
    messages: Option<u64>,
    recipients: Option<u64>,
    per: Duration,
    /// The text of `per`, for replies.
    per_text: String,
    prefix_v4: u8,
    prefix_v6: u8,
}

struct Ratelimit {
    limits: Vec<Limit>,
    on_unavailable: OnUnavailable,
}

/// `30s`, `5m`, `1h`, `1d`.
fn duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 30s, 5m, 1h, 1d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: expected e.g. 30s, 5m, 1h, 1d")),
    };
    if secs == 0 {
        return Err(format!("{text:?}: must be more than 0"));
    }
    Ok(Duration::from_secs(secs))
}

/// The client's counting key: its address, or its network.
fn client_key(ip: IpAddr, v4: u8, v6: u8) -> String {
    let prefix = if ip.is_ipv4() { v4 } else { v6 };
    match IpNet::new(ip, prefix) {
        Ok(net) if prefix < if ip.is_ipv4() { 32 } else { 128 } => net.trunc().to_string(),
        _ => ip.to_string(),
    }
}

/// The fixed window `now` falls in (its start, seconds since the epoch) and
/// the seconds left in it.
fn window(now: u64, per: Duration) -> (u64, u64) {
    let per = per.as_secs().max(1);
    let start = now - now % per;
    (start, start + per - now)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What is counted at one hook.
enum Count {
    Message,
    Recipient,
}

impl Ratelimit {
    fn from_config(c: RatelimitConfig) -> Result<Ratelimit, String> {
        let mut limits = Vec::new();
        for (i, l) in c.limits.into_iter().enumerate() {
            let per = duration(&l.per).map_err(|e| format!("limits[{i}].per: {e}"))?;
            if l.messages.is_none() && l.recipients.is_none() {
                return Err(format!("limits[{i}]: give messages, recipients or both"));
            }
            if (l.prefix_v4.is_some() || l.prefix_v6.is_some()) && l.by != By::Client {
                return Err(format!(
                    "limits[{i}]: prefix_v4 and prefix_v6 go with by = \"client\""
                ));
            }
            let prefix_v4 = l.prefix_v4.unwrap_or(32);
            let prefix_v6 = l.prefix_v6.unwrap_or(128);
            if prefix_v4 > 32 || prefix_v6 > 128 {
                return Err(format!(
                    "limits[{i}]: prefix_v4 is at most 32, prefix_v6 at most 128"
                ));
            }
            limits.push(Limit {
                by: l.by,
                messages: l.messages,
                recipients: l.recipients,
                per,
                per_text: l.per,
                prefix_v4,
                prefix_v6,
            });
        }
        Ok(Ratelimit {
            limits,
            on_unavailable: c.on_unavailable,
        })
    }

    /// Counts one message or recipient against every limit that applies
    /// (`subject` names what a limit counts by, or none) and answers the
    /// first one passed.
    fn count(&self, what: Count, subject: impl Fn(&Limit) -> Option<String>) -> Verdict {
        let now = now();
        for (i, limit) in self.limits.iter().enumerate() {
            let (max, noun) = match what {
                Count::Message => (limit.messages, "messages"),
                Count::Recipient => (limit.recipients, "recipients"),
            };
            let (Some(max), Some(value)) = (max, subject(limit)) else {
                continue;
            };
            let (start, left) = window(now, limit.per);
            let key = format!("{i}:{noun}:{value}:{start}");
            // The key lives as long as its window (and a minute more, so a
            // relay whose clock lags a little still finds it).
            let ttl = limit.per + Duration::from_secs(60);
            match kv::incr(&key, 1, Some(ttl)) {
                Ok(n) if n > max as i64 => {
                    let text = format!(
                        "rate limit: {max} {noun} per {} for {value}; try again in {left}s",
                        limit.per_text
                    );
                    return Verdict::tempfail(451, "4.7.1", &text);
                }
                Ok(_) => {}
                Err(e) => {
                    let why = match e {
                        kv::Error::Unavailable(m) => m,
                        other => format!("{other:?}"),
                    };
                    postern_sdk::log::warn(&format!("rate limit store unavailable: {why}"));
                    if self.on_unavailable == OnUnavailable::Tempfail {
                        return Verdict::tempfail(
                            451,
                            "4.7.1",
                            "rate limits cannot be checked now",
                        );
                    }
                }
            }
        }
        Verdict::Continue
    }
}

/// What the limits count by for one transaction.
struct Subjects {
    client: IpAddr,
    auth_user: Option<String>,
    /// Lowercase; none for the null sender.
    sender_domain: Option<String>,
}

impl Subjects {
    fn of(session: &Session, envelope: &Envelope) -> Subjects {
        Subjects {
            client: session.peer_ip.into(),
            auth_user: session.auth_user.clone(),
            sender_domain: (!envelope.sender.is_null())
                .then(|| envelope.sender.domain().to_ascii_lowercase()),
        }
    }

    /// What `limit` counts, with `recipient_domain` for recipient limits.
    fn get(&self, limit: &Limit, recipient_domain: Option<&str>) -> Option<String> {
        match limit.by {
            By::Client => Some(client_key(self.client, limit.prefix_v4, limit.prefix_v6)),
            By::AuthUser => self.auth_user.clone(),
            By::SenderDomain => self.sender_domain.clone(),
            By::RecipientDomain => recipient_domain.map(str::to_string),
        }
    }
}

#[postern_sdk::plugin]
impl Plugin for Ratelimit {
    fn init(config: Config) -> Result<Self, ConfigError> {
        Ratelimit::from_config(config.parse()?).map_err(ConfigError)
    }

    /// A message counts once per transaction, at MAIL FROM.
    fn mail_from(&self, session: &Session, envelope: &Envelope) -> Verdict {
        let subjects = Subjects::of(session, envelope);
        self.count(Count::Message, |l| subjects.get(l, None))
    }

    /// Each recipient counts; the first recipient of a domain also counts
    /// the message against that domain's message limits.
    fn rcpt(&self, session: &Session, rcpt: &Recipient) -> Verdict {
        let envelope = postern_sdk::envelope();
        let subjects = Subjects::of(session, &envelope);
        let domain = rcpt.domain().to_ascii_lowercase();
        let first_of_domain = !envelope
            .recipients
            .iter()
            .any(|r| r.domain().eq_ignore_ascii_case(&domain));
        if first_of_domain {
            let v = self.count(Count::Message, |l| {
                (l.by == By::RecipientDomain).then(|| domain.clone())
            });
            if v != Verdict::Continue {
                return v;
            }
        }
        self.count(Count::Recipient, |l| subjects.get(l, Some(&domain)))
    }
}

postern_sdk::export!(Ratelimit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_windows() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(duration("0m").is_err());
        assert!(duration("5 minutes").is_err());
        // A minute window: starts on the minute, the rest of it is left.
        assert_eq!(window(1_000_000, Duration::from_secs(60)), (999_960, 20));
        assert_eq!(
            window(1_000_000, Duration::from_secs(86_400)),
            (950_400, 36_800)
        );
        assert_eq!(window(60, Duration::from_secs(60)), (60, 60));
    }

    #[test]
    fn clients_count_by_address_or_network() {
        let v4: IpAddr = "192.0.2.77".parse().unwrap();
        let v6: IpAddr = "2001:db8:1:2:3::9".parse().unwrap();
        assert_eq!(client_key(v4, 32, 128), "192.0.2.77");
        assert_eq!(client_key(v4, 24, 64), "192.0.2.0/24");
        assert_eq!(client_key(v6, 24, 64), "2001:db8:1:2::/64");
        assert_eq!(client_key(v6, 24, 128), "2001:db8:1:2:3::9");
    }

    #[test]
    fn config_errors_name_the_limit() {
        let parse = |json: &str| {
            Ratelimit::from_config(serde_json::from_str(json).unwrap())
                .err()
                .unwrap_or_default()
        };
        assert!(parse(r#"{"limits": [{"by": "client", "per": "1m"}]}"#)
            .contains("limits[0]: give messages"));
        assert!(parse(
            r#"{"limits": [{"by": "auth_user", "messages": 1, "per": "1m", "prefix_v4": 24}]}"#
        )
        .contains("go with by = \"client\""));
        assert!(
            parse(r#"{"limits": [{"by": "client", "messages": 1, "per": "soon"}]}"#)
                .contains("limits[0].per")
        );
        assert!(serde_json::from_str::<RatelimitConfig>(
            r#"{"limits": [{"by": "moon", "messages": 1, "per": "1m"}]}"#
        )
        .is_err());
    }
}
