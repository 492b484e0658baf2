//! `Authentication-Results` fields (RFC 8601) as JSON: the verifier's id
//! and each method's result with its properties, so an archive keeps what
//! SPF, DKIM, DMARC and ARC said about the message in a form a search tool
//! reads without parsing mail headers.

use serde_json::{json, Value};

/// Splits on `;` outside quotes and comments; comments are dropped.
fn clauses(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for c in value.chars() {
        if escaped {
            if depth == 0 {
                cur.push(c);
            }
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            ';' if !quoted && depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        if depth == 0 && c != '(' && c != ')' {
            cur.push(c);
        }
    }
    out.push(cur);
    out.into_iter().filter(|c| !c.trim().is_empty()).collect()
}

/// The words of a clause, split at white space outside quotes, quotes
/// removed.
fn words(clause: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in clause.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// One field's value as JSON.
pub fn parse(value: &str) -> Value {
    let mut parts = clauses(value).into_iter();
    let authserv = parts.next().unwrap_or_default();
    let authserv_id = words(&authserv).into_iter().next().unwrap_or_default();
    let mut results = Vec::new();
    for clause in parts {
        let words = words(&clause);
        let mut words = words.iter();
        let Some((method, result)) = words.next().and_then(|w| w.split_once('=')) else {
            continue;
        };
        let mut properties = serde_json::Map::new();
        let mut reason = None;
        for w in words {
            if let Some((k, v)) = w.split_once('=') {
                if k.eq_ignore_ascii_case("reason") {
                    reason = Some(v.to_string());
                } else {
                    properties.insert(k.to_ascii_lowercase(), Value::String(v.to_string()));
                }
            }
        }
        let mut r = json!({
            "method": method.to_ascii_lowercase(),
            "result": result.to_ascii_lowercase(),
            "properties": properties,
        });
        if let Some(reason) = reason {
            r["reason"] = Value::String(reason);
        }
        results.push(r);
    }
    json!({ "authserv_id": authserv_id, "results": results })
}

/// Every field's value, in order.
pub fn parse_all(values: &[String]) -> Value {
    Value::Array(values.iter().map(|v| parse(v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_as_json() {
        for (field, expected) in [
            (
                "mx.example.org; spf=pass smtp.mailfrom=jo@example.com; dkim=pass (2048-bit key) header.d=example.com header.s=sel1; dmarc=pass header.from=example.com",
                json!({"authserv_id": "mx.example.org", "results": [
                    {"method": "spf", "result": "pass", "properties": {"smtp.mailfrom": "jo@example.com"}},
                    {"method": "dkim", "result": "pass", "properties": {"header.d": "example.com", "header.s": "sel1"}},
                    {"method": "dmarc", "result": "pass", "properties": {"header.from": "example.com"}},
                ]}),
            ),
            (
                "relay.test 1; none",
                json!({"authserv_id": "relay.test", "results": []}),
            ),
            (
                "mx.example.org; dkim=fail reason=\"bad; signature\" header.i=@example.com",
                json!({"authserv_id": "mx.example.org", "results": [
                    {"method": "dkim", "result": "fail", "reason": "bad; signature", "properties": {"header.i": "@example.com"}},
                ]}),
            ),
        ] {
            assert_eq!(parse(field), expected, "{field}");
        }
        assert_eq!(parse_all(&[]), json!([]));
    }
}
