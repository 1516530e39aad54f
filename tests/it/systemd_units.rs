//! The files in `systemd/`: both units pass `systemd-analyze verify` (with `ExecStart=`
//! pointed at the built binary), a misspelt directive fails it, and the example
//! `/etc/pgspool/pgspool.toml` is a valid configuration that agrees with the units.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use humantime_serde::re::humantime;
use pgspool::config::Config;

/// The `systemd/` directory of the source tree.
fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// The text of the unit or file `name` in `systemd/`.
fn read(name: &str) -> String {
    let path = systemd_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `key=` in a unit's text, in order (comments are whole lines in units).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The one value of `key=` in a unit's text.
fn value<'a>(unit: &'a str, key: &str) -> &'a str {
    match values(unit, key)[..] {
        [one] => one,
        ref other => panic!("{key}= is set {} times, not once", other.len()),
    }
}

/// Runs `systemd-analyze verify` on the two units, as edited by `edit_service` after
/// `ExecStart=` was pointed at the built binary, in a directory of their own (where each
/// finds the other). `Err` holds everything it printed when it failed or printed anything
/// at all: it reports a misspelt directive or a bad value only as a warning, with exit
/// code 0, and such a line in either unit is a failure here.
fn verify(edit_service: impl Fn(String) -> String) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = read("pgspool.service");
    let exec_start = "ExecStart=/usr/bin/pgspool run ";
    assert_eq!(service.matches(exec_start).count(), 1, "{service}");
    let binary = env!("CARGO_BIN_EXE_pgspool");
    let service = service.replace(exec_start, &format!("ExecStart={binary} run "));
    std::fs::write(dir.path().join("pgspool.service"), edit_service(service)).expect("write");
    std::fs::write(dir.path().join("pgspool.socket"), read("pgspool.socket")).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        // No Documentation= to look up, and the machine's generators are not the units'.
        .args(["--man=no", "--generators=no"])
        .arg(dir.path().join("pgspool.socket"))
        .arg(dir.path().join("pgspool.service"))
        // Warnings must reach stderr whatever the environment asks for.
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}): it is in Debian's package systemd \
                 (apt-get install systemd; .ci/run installs it)"
            )
        });
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && printed.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("systemd-analyze verify: {}\n{printed}", out.status))
    }
}

#[test]
fn both_units_pass_systemd_analyze_verify() {
    if let Err(e) = verify(|service| service) {
        panic!("{e}");
    }
}

#[test]
fn a_misspelt_directive_or_a_bad_value_fails_verification() {
    // Proof that the check above is strict: systemd ignores both with a warning only.
    for (right, wrong, reported) in [
        ("\nProtectHome=yes\n", "\nProtectHom=yes\n", "Unknown key"),
        (
            "\nRestrictRealtime=yes\n",
            "\nRestrictRealtime=maybe\n",
            "maybe",
        ),
        (
            "\nRequires=pgspool.socket\n",
            "\nRequires=pgspool-typo.socket\n",
            "pgspool-typo.socket",
        ),
    ] {
        let e = verify(|service| {
            assert!(service.contains(right), "{right} is not in the service");
            service.replace(right, wrong)
        })
        .expect_err(wrong);
        assert!(e.contains(reported), "{wrong}: {e}");
    }
}

#[test]
fn the_example_config_is_valid_and_agrees_with_the_units() {
    let config = Config::load(&systemd_dir().join("pgspool.toml")).expect("parse");
    config.validate().expect("valid");
    let service = read("pgspool.service");
    let socket = read("pgspool.socket");
    // The daemon is started with this file, where the README installs it.
    assert!(
        value(&service, "ExecStart").ends_with(" run --config /etc/pgspool/pgspool.toml"),
        "{service}"
    );
    // It names the socket the socket unit listens on, in the runtime directory.
    assert_eq!(
        config.listen.socket,
        Path::new(value(&socket, "ListenStream"))
    );
    assert_eq!(
        config.listen.socket.parent(),
        Some(
            Path::new("/run")
                .join(value(&service, "RuntimeDirectory"))
                .as_path()
        )
    );
    // The WAL is the service's state directory.
    assert_eq!(
        config.wal.dir,
        Path::new("/var/lib").join(value(&service, "StateDirectory"))
    );
    // systemd waits for the drain, with time to spare, before it kills the daemon; both for
    // the example and for the default.
    let stop = humantime::parse_duration(value(&service, "TimeoutStopSec")).expect("duration");
    let default = Config::default().shutdown.drain_timeout;
    for drain in [config.shutdown.drain_timeout, default] {
        assert!(
            stop >= drain + Duration::from_secs(10),
            "TimeoutStopSec={stop:?} leaves too little beyond drain_timeout = {drain:?}"
        );
    }
    // The users and groups the units run as and give the socket to are created.
    let sysusers = read("sysusers.d/pgspool.conf");
    let declared = |kind: &str, name: &str| {
        sysusers.lines().any(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some(kind) && words.next() == Some(name)
        })
    };
    // A `u` line creates the user and a group of the same name.
    for user in [value(&service, "User"), value(&socket, "SocketUser")] {
        assert!(
            declared("u", user),
            "{user} is not in sysusers.d: {sysusers}"
        );
    }
    assert!(declared("u", value(&service, "Group")), "{sysusers}");
    assert!(declared("g", value(&socket, "SocketGroup")), "{sysusers}");
}
