//! The Python and JavaScript example plugins (`examples/plugins/{python,js}`)
//! and the JavaScript fixture `hoard.js`, built once per test run by their own build scripts with the toolchains
//! the SDKs pin (`host/scripts/test.sh` installs them into `target/sdk-tools`;
//! a build whose inputs did not change is skipped), then compiled once into
//! the plugin cache the tests share, so tests that start relays in parallel
//! never compile the same 12-18 MB component twice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use postern::config::Config;
use postern::plugins::Runtime;

/// The workspace's target folder (as cargo was told, or the default).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The checkout's root folder.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The compiled-plugin cache the tests share.
pub fn shared_cache() -> PathBuf {
    target_dir().join("postern-test-plugin-cache")
}

/// `examples/plugins/python/tagger.py`, built: `tagger-py.wasm`.
pub fn python_tagger() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| built("examples/plugins/python/build.sh", "tagger-py.wasm"))
}

/// `examples/plugins/js/tagger.js`, built: `tagger-js.wasm`.
pub fn js_tagger() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| built("examples/plugins/js/build.sh", "tagger-js.wasm"))
}

/// `host/tests/fixtures/plugins/hoard-js/hoard.js`, built with the
/// JavaScript SDK: `hoard-js.wasm`, whose memory grows with every call.
pub fn js_hoard() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let out = target_dir().join("lang-plugins").join("hoard-js.wasm");
        let status = Command::new("node")
            .arg(repo().join("sdk/js/build.mjs"))
            .arg(repo().join("host/tests/fixtures/plugins/hoard-js/hoard.js"))
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| panic!("running node: {e}"));
        assert!(status.success(), "building hoard.js failed ({status})");
        compile_into_shared_cache(&out);
        out
    })
}

/// Runs a build script with its output path and compiles the result into
/// the shared cache.
fn built(script: &str, name: &str) -> PathBuf {
    let out = target_dir().join("lang-plugins").join(name);
    let status = Command::new(repo().join(script))
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(status.success(), "{script} failed ({status})");
    compile_into_shared_cache(&out);
    out
}

/// Compiles `file` as a test relay would (default `[plugins]`, so the same
/// engine settings) into [`shared_cache`]. On a thread of its own, since the
/// caller may be inside a tokio runtime.
pub fn compile_into_shared_cache(file: &Path) {
    let file = file.to_path_buf();
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().expect("a scratch folder");
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[plugins]\ncache_dir = {:?}\nwatch = false\n",
            shared_cache()
        );
        let config = Config::parse(&text, &dir.path().join("postern.toml")).expect("config");
        let bytes = std::fs::read(&file).expect("the built plugin");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async {
                Runtime::new(&config)
                    .expect("the plugin runtime")
                    .requirements(bytes, config.plugin_cache_dir())
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            });
    })
    .join()
    .expect("compiling the plugin");
}
