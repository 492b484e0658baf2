//! `examples/postern.service` is a unit systemd accepts, with the hardening
//! the README promises.

use std::process::Command;

#[test]
fn the_example_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/postern.service"
    ))
    .unwrap();
    for line in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ReadWritePaths=/var/spool/postern",
        "SocketBindAllow=tcp:25",
        "SocketBindAllow=udp",
        "SocketBindDeny=any",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    assert!(
        !unit
            .lines()
            .any(|l| l.starts_with("MemoryDenyWriteExecute")),
        "wasmtime needs executable pages"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed here; the unit was only read");
        return;
    }
    // verify checks that ExecStart's program exists: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/postern", env!("CARGO_BIN_EXE_postern")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    super::assert_silent(&out, "systemd-analyze verify");
}
