//! The files in `systemd/`: both units pass `systemd-analyze verify` (with `ExecStart=`
//! pointed at the built binary), a misspelt directive fails it, the service's sandbox
//! scores well in `systemd-analyze security`, `systemd-sysusers` creates the users and
//! groups they name, and the example `/etc/pgspool/pgspool.toml` is a valid configuration
//! that agrees with the units.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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

/// The two units in a directory of their own (where each finds the other), with
/// `ExecStart=` pointed at the built binary, then the service edited by `edit_service`.
fn units(edit_service: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let service = read("pgspool.service");
    let exec_start = "ExecStart=/usr/bin/pgspool run ";
    assert_eq!(service.matches(exec_start).count(), 1, "{service}");
    let binary = env!("CARGO_BIN_EXE_pgspool");
    let service = service.replace(exec_start, &format!("ExecStart={binary} run "));
    std::fs::write(dir.path().join("pgspool.service"), edit_service(service)).expect("write");
    std::fs::write(dir.path().join("pgspool.socket"), read("pgspool.socket")).expect("write");
    dir
}

/// Runs `systemd-analyze` with `args`, its log on stderr whatever the environment asks for.
fn run_systemd_analyze(args: &[&OsStr]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}): it is in Debian's package systemd \
                 (apt-get install systemd; .ci/run installs it)"
            )
        })
}

/// Runs `systemd-analyze` with `args`: `Err` holds everything it printed when it failed
/// or printed anything at all.
fn systemd_analyze(args: &[&OsStr]) -> Result<(), String> {
    let out = run_systemd_analyze(args);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && printed.trim().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "systemd-analyze {args:?}: {}\n{printed}",
            out.status
        ))
    }
}

/// Runs `systemd-analyze verify` on the two units of [`units`]. It reports a misspelt
/// directive or a bad value only as a warning, with exit code 0: any line it prints, for
/// either unit, is a failure here.
fn verify(edit_service: impl Fn(String) -> String) -> Result<(), String> {
    let dir = units(edit_service);
    let socket = dir.path().join("pgspool.socket");
    let service = dir.path().join("pgspool.service");
    systemd_analyze(&[
        OsStr::new("verify"),
        // No Documentation= to look up, and the machine's generators are not the units'.
        OsStr::new("--man=no"),
        OsStr::new("--generators=no"),
        socket.as_os_str(),
        service.as_os_str(),
    ])
}

#[test]
fn both_units_pass_systemd_analyze_verify() {
    if let Err(e) = verify(|service| service) {
        panic!("{e}");
    }
}

#[test]
fn the_service_stays_sandboxed() {
    // systemd's own score of the sandbox, printed from 0.0 (sandboxed) to 10.0 (exposed),
    // with --threshold in tenths: 1.2 now; dropping ProtectSystem=, ProtectHome= and
    // CapabilityBoundingSet= alone makes it 3.4.
    let dir = units(|service| service);
    let service = dir.path().join("pgspool.service");
    let out = run_systemd_analyze(&[
        OsStr::new("security"),
        OsStr::new("--offline=true"),
        OsStr::new("--threshold=15"),
        OsStr::new("--no-pager"),
        service.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "the exposure of pgspool.service is above 1.5: {}",
        String::from_utf8_lossy(&out.stdout)
    );
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
}

/// The lines of `etc/NAME` under `root`, split at `:`.
fn entries(root: &Path, name: &str) -> Vec<Vec<String>> {
    let path = root.join("etc").join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|line| line.split(':').map(str::to_string).collect())
        .collect()
}

#[test]
fn sysusers_creates_the_users_and_groups_the_units_name() {
    // systemd-sysusers applied to an empty root directory, not to this machine.
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("etc")).expect("etc");
    let conf = std::fs::File::open(systemd_dir().join("sysusers.d/pgspool.conf")).expect("open");
    let out = Command::new("systemd-sysusers")
        .arg("--root")
        .arg(root.path())
        .arg("-")
        .stdin(conf)
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-sysusers ({e}): it is in Debian's package systemd")
        });
    let printed = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {printed}", out.status);
    // It says what it creates, and nothing else (no warning about a line).
    assert!(
        printed.lines().all(|line| line.starts_with("Creating ")),
        "{printed}"
    );
    let service = read("pgspool.service");
    let socket = read("pgspool.socket");
    let passwd = entries(root.path(), "passwd");
    let group = entries(root.path(), "group");
    let gid = |name: &str| {
        group
            .iter()
            .find(|g| g[0] == name)
            .unwrap_or_else(|| panic!("no group {name}: {group:?}"))[2]
            .clone()
    };
    let user = value(&service, "User");
    assert_eq!(value(&socket, "SocketUser"), user);
    let entry = passwd
        .iter()
        .find(|p| p[0] == user)
        .unwrap_or_else(|| panic!("no user {user}: {passwd:?}"));
    // Its own group, the service's Group=; its home, the WAL directory; no login.
    assert_eq!(entry[3], gid(value(&service, "Group")), "{entry:?}");
    assert_eq!(
        Path::new(&entry[5]),
        Path::new("/var/lib").join(value(&service, "StateDirectory"))
    );
    assert!(entry[6].ends_with("nologin"), "{entry:?}");
    // The writers' group, with nobody in it yet.
    let writers = value(&socket, "SocketGroup");
    assert_ne!(gid(writers), entry[3]);
    assert!(
        group.iter().any(|g| g[0] == writers && g[3].is_empty()),
        "{group:?}"
    );
}
