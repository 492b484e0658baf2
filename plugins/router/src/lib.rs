//! Routes each recipient by the first rule that matches it. See README.md.

use postern_sdk::prelude::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterConfig {
    #[serde(default)]
    rules: Vec<RuleConfig>,
    /// The older form: recipient domain (or `*`) to target.
    #[serde(default)]
    routes: std::collections::BTreeMap<String, String>,
}

/// A rule as written: conditions (all must hold) and a target.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    domain: Option<String>,
    recipient: Option<String>,
    sender_domain: Option<String>,
    auth_user: Option<String>,
    listener: Option<String>,
    metadata: Option<MetadataMatch>,
    to: String,
}

#[derive(serde::Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct MetadataMatch {
    plugin: String,
    key: String,
    value: String,
}

/// What a rule matches; `None` matches anything.
#[derive(Debug, Default, PartialEq)]
struct Conditions {
    domain: Option<String>,
    recipient: Option<String>,
    sender_domain: Option<String>,
    auth_user: Option<String>,
    listener: Option<String>,
    metadata: Option<MetadataMatch>,
}

/// Looks up another plugin's transaction metadata: (plugin, key) to value.
type MetadataLookup<'a> = &'a dyn Fn(&str, &str) -> Option<String>;

/// The facts of one recipient's delivery that rules look at.
#[derive(Default)]
struct Facts<'a> {
    recipient: &'a str,
    sender_domain: &'a str,
    auth_user: Option<&'a str>,
    listener: Option<String>,
    metadata: Option<MetadataLookup<'a>>,
}

/// `example.com` matches that domain; `*.example.com` its subdomains (not
/// itself); `*` any. Case does not matter.
fn domain_matches(pattern: &str, domain: &str) -> bool {
    let domain = domain.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        _ if pattern == "*" => true,
        Some(parent) => {
            domain.len() > parent.len() + 1
                && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent)
                && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
        }
        None => domain.eq_ignore_ascii_case(pattern),
    }
}

impl Conditions {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let rcpt_domain = f.recipient.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        self.domain
            .as_deref()
            .is_none_or(|p| domain_matches(p, rcpt_domain))
            && self
                .recipient
                .as_deref()
                .is_none_or(|r| r.eq_ignore_ascii_case(f.recipient))
            && self
                .sender_domain
                .as_deref()
                .is_none_or(|p| domain_matches(p, f.sender_domain))
            && self
                .auth_user
                .as_deref()
                .is_none_or(|u| f.auth_user == Some(u))
            && self
                .listener
                .as_deref()
                .is_none_or(|l| f.listener.as_deref() == Some(l))
            && self.metadata.as_ref().is_none_or(|m| {
                f.metadata
                    .and_then(|get| get(&m.plugin, &m.key))
                    .is_some_and(|v| v == m.value)
            })
    }
}

/// Parses a target: `mx`, `mx:DOMAIN`, `smtp://...`, `smtps://...`,
/// `pool:NAME`, `local:FOLDER`, `discard`, `reject`.
fn target(text: &str, pools: &[String]) -> Result<Route, String> {
    if text == "mx" {
        return Ok(Route::Default);
    }
    if let Some(d) = text.strip_prefix("mx:") {
        return Ok(Route::mx(d));
    }
    if text.starts_with("smtp://") || text.starts_with("smtps://") {
        return Ok(Route::smarthost(text));
    }
    if let Some(p) = text.strip_prefix("pool:") {
        if !pools.iter().any(|known| known == p) {
            return Err(format!(
                "pool {p:?} is not in the relay's [delivery.pools] (it has: {})",
                if pools.is_empty() {
                    "none".to_string()
                } else {
                    pools.join(", ")
                }
            ));
        }
        return Ok(Route::pool(p));
    }
    if let Some(f) = text.strip_prefix("local:") {
        return Ok(Route::local_folder(f));
    }
    match text {
        "discard" => Ok(Route::Discard),
        "reject" => Ok(Route::reject(550, "5.1.2", "no route to this recipient")),
        _ => Err(format!(
            "unknown target {text:?}: use mx, mx:DOMAIN, smtp://..., smtps://..., pool:NAME, local:FOLDER, discard or reject"
        )),
    }
}

struct Router {
    rules: Vec<(Conditions, Route)>,
}

impl Router {
    fn from_config(c: RouterConfig, pools: &[String]) -> Result<Router, String> {
        if c.rules.is_empty() && c.routes.is_empty() {
            return Err("give `rules` (or `routes`): a router with none routes nothing".into());
        }
        let mut rules = Vec::new();
        for (i, r) in c.rules.into_iter().enumerate() {
            let route = target(&r.to, pools).map_err(|e| format!("rules[{i}]: {e}"))?;
            let conditions = Conditions {
                domain: r.domain,
                recipient: r.recipient,
                sender_domain: r.sender_domain,
                auth_user: r.auth_user,
                listener: r.listener,
                metadata: r.metadata,
            };
            rules.push((conditions, route));
        }
        // `routes` after `rules`, the `*` entry last.
        let (any, domains): (Vec<_>, Vec<_>) = c.routes.into_iter().partition(|(d, _)| d == "*");
        for (domain, to) in domains.into_iter().chain(any) {
            let route = target(&to, pools).map_err(|e| format!("routes.{domain}: {e}"))?;
            let conditions = Conditions {
                domain: Some(domain),
                ..Conditions::default()
            };
            rules.push((conditions, route));
        }
        Ok(Router { rules })
    }

    fn route_for(&self, facts: &Facts<'_>) -> Route {
        self.rules
            .iter()
            .find(|(c, _)| c.matches(facts))
            .map(|(_, r)| r.clone())
            .unwrap_or(Route::Default)
    }

    /// Whether a rule looks at the session, or at metadata.
    fn needs(&self) -> (bool, bool) {
        let session = self
            .rules
            .iter()
            .any(|(c, _)| c.auth_user.is_some() || c.listener.is_some());
        let metadata = self.rules.iter().any(|(c, _)| c.metadata.is_some());
        (session, metadata)
    }
}

#[postern_sdk::plugin]
impl Plugin for Router {
    fn init(config: Config) -> Result<Self, ConfigError> {
        let parsed: RouterConfig = config.parse()?;
        Router::from_config(parsed, &postern_sdk::pools()).map_err(ConfigError)
    }

    fn route(&self, envelope: &Envelope, rcpt: &Recipient, _headers: &Headers) -> Routing {
        let (wants_session, wants_metadata) = self.needs();
        let session = wants_session.then(postern_sdk::find_session).flatten();
        let recipient = rcpt.to_string();
        let get = |plugin: &str, key: &str| metadata::get_from(plugin, Scope::Transaction, key);
        let facts = Facts {
            recipient: &recipient,
            sender_domain: envelope.sender.domain(),
            auth_user: session.as_ref().and_then(|s| s.auth_user.as_deref()),
            listener: session.as_ref().map(|s| s.local().to_string()),
            metadata: wants_metadata.then_some(&get as MetadataLookup<'_>),
        };
        self.route_for(&facts).into()
    }
}

postern_sdk::export!(Router);

#[cfg(test)]
mod tests {
    use super::*;

    fn router(toml_rules: &str) -> Result<Router, String> {
        let parsed: RouterConfig = toml_like(toml_rules);
        Router::from_config(parsed, &["outbound".to_string()])
    }

    /// The test configs are JSON, as the relay hands the TOML table to init.
    fn toml_like(json: &str) -> RouterConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn domain_patterns() {
        for (pattern, domain, expected) in [
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com.", true),
            ("example.com", "mail.example.com", false),
            ("*.example.com", "mail.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("*", "anything.test", true),
        ] {
            assert_eq!(
                domain_matches(pattern, domain),
                expected,
                "{pattern} {domain}"
            );
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let r = router(
            r#"{"rules": [
                {"recipient": "ceo@example.com", "to": "smtp://vip.example:25"},
                {"domain": "*.example.com", "to": "mx:relay.example.com"},
                {"domain": "example.com", "sender_domain": "news.example", "to": "pool:outbound"},
                {"auth_user": "app", "to": "local:apps"},
                {"listener": "127.0.0.1:587", "to": "discard"},
                {"metadata": {"plugin": "dlp", "key": "class", "value": "secret"}, "to": "reject"},
                {"domain": "example.com", "to": "mx"}
            ],
            "routes": {"*": "smtp://fallback.example:25", "old.example": "discard"}}"#,
        )
        .unwrap();
        fn secret(p: &str, k: &str) -> Option<String> {
            (p == "dlp" && k == "class").then(|| "secret".to_string())
        }
        fn none(_: &str, _: &str) -> Option<String> {
            None
        }
        type Lookup = fn(&str, &str) -> Option<String>;
        let facts = |rcpt, sender, user, listener, meta: &'static Lookup| Facts {
            recipient: rcpt,
            sender_domain: sender,
            auth_user: user,
            listener,
            metadata: Some(meta),
        };
        let cases: Vec<(Facts<'_>, Route)> = vec![
            (
                facts("CEO@example.com", "x.test", None, None, &(none as Lookup)),
                Route::smarthost("smtp://vip.example:25"),
            ),
            (
                facts(
                    "a@mail.example.com",
                    "x.test",
                    None,
                    None,
                    &(none as Lookup),
                ),
                Route::mx("relay.example.com"),
            ),
            (
                facts(
                    "a@example.com",
                    "news.example",
                    None,
                    None,
                    &(none as Lookup),
                ),
                Route::pool("outbound"),
            ),
            (
                facts("a@x.test", "x.test", Some("app"), None, &(none as Lookup)),
                Route::local_folder("apps"),
            ),
            (
                facts(
                    "a@x.test",
                    "x.test",
                    None,
                    Some("127.0.0.1:587".into()),
                    &(none as Lookup),
                ),
                Route::Discard,
            ),
            (
                facts("a@x.test", "x.test", None, None, &(secret as Lookup)),
                Route::reject(550, "5.1.2", "no route to this recipient"),
            ),
            (
                facts("a@example.com", "x.test", None, None, &(none as Lookup)),
                Route::Default,
            ),
            (
                facts("a@old.example", "x.test", None, None, &(none as Lookup)),
                Route::Discard,
            ),
            (
                facts("a@other.test", "x.test", None, None, &(none as Lookup)),
                Route::smarthost("smtp://fallback.example:25"),
            ),
        ];
        for (f, expected) in cases {
            assert_eq!(r.route_for(&f), expected, "{}", f.recipient);
        }
    }

    #[test]
    fn unknown_pools_and_targets_are_refused_at_load() {
        let e = router(r#"{"rules": [{"domain": "a.test", "to": "pool:nope"}]}"#)
            .err()
            .unwrap();
        assert!(
            e.contains(
                "rules[0]: pool \"nope\" is not in the relay's [delivery.pools] (it has: outbound)"
            ),
            "{e}"
        );
        let e = router(r#"{"routes": {"a.test": "teleport"}}"#)
            .err()
            .unwrap();
        assert!(
            e.starts_with("routes.a.test: unknown target \"teleport\""),
            "{e}"
        );
        assert!(serde_json::from_str::<RouterConfig>(
            r#"{"rules": [{"domian": "a", "to": "mx"}]}"#
        )
        .is_err());
        let e = router("{}").err().unwrap();
        assert!(e.starts_with("give `rules`"), "{e}");
    }
}
