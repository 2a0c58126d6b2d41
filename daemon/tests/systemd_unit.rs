//! The systemd unit: `systemd-analyze verify` accepts it and `systemd-analyze security` rates its exposure
//! OK or better (skipped, with the reason printed, where systemd-analyze is missing).

use std::process::Command;

fn unit_with_built_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/rlaifd.service")).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let path = dir.join("rlaifd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/rlaifd", env!("CARGO_BIN_EXE_rlaifd"))).unwrap();
    path
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        println!("SKIPPED: systemd-analyze is not installed here");
        return;
    }
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/rlaifd.service")).unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=rlaifd",
        "RuntimeDirectory=rlaifd",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DeviceAllow=/dev/nvidiactl",
        "ExecStart=/usr/local/bin/rlaifd serve",
    ] {
        assert!(unit.contains(want), "the unit lacks {want}");
    }
    let dir = std::env::temp_dir().join(format!("rlaifd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = unit_with_built_binary(&dir);
    let o = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("rlaifd.service:"), "systemd-analyze verify: {err}");
    let o = Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(&path).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    match out.lines().find(|l| l.contains("Overall exposure level")) {
        Some(l) => {
            let score: f64 = l
                .split(':')
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(10.0);
            println!("{}", l.trim());
            assert!(score <= 4.0, "exposure {score} (OK is below 4.5 on systemd's scale): {out}");
        }
        None => println!(
            "SKIPPED security rating: this systemd-analyze has no offline security ({})",
            out.lines().next().unwrap_or("")
        ),
    }
    std::fs::remove_dir_all(&dir).ok();
}
