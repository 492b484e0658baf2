//! HTTP requests with curl, a client nobody here wrote, to the admin
//! listener or the control socket.

use std::process::Command;

/// One answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The response headers, as sent.
    pub headers: String,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The body as JSON (panics when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// A header's value (the first, case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Runs curl with `args` (URL included) and returns the answer.
pub fn curl(args: &[&str]) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o", "-", "-D"])
        .arg(&headers)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: status.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: body.to_string(),
    }
}

/// GET `url` with the bearer token, if any.
pub fn get(url: &str, token: Option<&str>) -> Answer {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec![url];
    if let Some(a) = &auth {
        args.extend(["-H", a]);
    }
    curl(&args)
}

/// POST a JSON body to `url` with the bearer token, if any.
pub fn post_json(url: &str, token: Option<&str>, body: &serde_json::Value) -> Answer {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    match &auth {
        Some(a) => post_with(url, &["-H", a], body),
        None => post_with(url, &[], body),
    }
}

/// POST a JSON body to `url` with more curl arguments (credentials, headers).
pub fn post_with(url: &str, more: &[&str], body: &serde_json::Value) -> Answer {
    let body = body.to_string();
    let mut args = vec![
        url,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &body,
    ];
    args.extend_from_slice(more);
    curl(&args)
}

/// Waits until `url` answers 200 (the relay is ready), for up to 20 s.
pub fn wait_ready(url: &str, token: Option<&str>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let auth = format!("Authorization: Bearer {}", token.unwrap_or(""));
    loop {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                &auth,
                url,
            ])
            .output()
            .expect("running curl");
        if out.stdout == b"200" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} never answered 200"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
