//! Routes recipients by domain (case-insensitive; `*` matches any other).
//!
//! ```toml
//! [[plugin]]
//! name = "router"
//! path = "router.wasm"
//! [plugin.config.routes]
//! "partner.example" = "smtp://gateway.partner.example:587"
//! "legacy.example" = "mx:mail.example"
//! "archive.example" = "local:archive"
//! "void.example" = "discard"
//! "gone.example" = "reject"
//! ```

use std::collections::HashMap;

use postern_sdk::prelude::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Router {
    routes: HashMap<String, String>,
}

fn parse(rule: &str) -> Result<Route, String> {
    if let Some(d) = rule.strip_prefix("mx:") {
        Ok(Route::mx(d))
    } else if rule.starts_with("smtp://") || rule.starts_with("smtps://") {
        Ok(Route::smarthost(rule))
    } else if let Some(f) = rule.strip_prefix("local:") {
        Ok(Route::local_folder(f))
    } else if rule == "discard" {
        Ok(Route::Discard)
    } else if rule == "reject" {
        Ok(Route::reject(550, "5.1.2", "no route to this domain"))
    } else {
        Err(format!("unknown route {rule:?}: use mx:DOMAIN, smtp://..., smtps://..., local:FOLDER, discard or reject"))
    }
}

#[postern_sdk::plugin]
impl Plugin for Router {
    fn init(config: Config) -> Result<Self, ConfigError> {
        let router: Router = config.parse()?;
        for rule in router.routes.values() {
            parse(rule).map_err(ConfigError)?;
        }
        Ok(router)
    }

    fn route(&self, _envelope: &Envelope, rcpt: &Recipient, _headers: &Headers) -> Route {
        let domain = rcpt.domain().to_ascii_lowercase();
        let rule = self
            .routes
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(&domain))
            .or_else(|| self.routes.get_key_value("*"))
            .map(|(_, r)| r);
        match rule.map(|r| parse(r)) {
            Some(Ok(route)) => route,
            _ => Route::Default,
        }
    }
}

postern_sdk::export!(Router);
