//! The PostgreSQL password from `[postgres] password_file` or libpq's password file
//! (`PGPASSFILE`), against a server that asks pgspool's role for it (scram-sha-256): the
//! daemon loads with it, reads the file again on SIGHUP, refuses a file others may read,
//! and the password appears in none of its log, `pgspool status --json`, `/metrics`,
//! or error messages.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::harness::{DaemonProcess, Pg, client, post_ndjson, short_tempdir, wait_until};

const PASSWORD: &str = "pw-4c9e1b-right";
const WRONG: &str = "pw-77a0d3-wrong";

/// A server where the role `spool` (INSERT on `ev`, its own `pgspool` schema) must give
/// its password; `postgres` stays trusted for the test's own connection.
async fn server_asking_for_a_password() -> Pg {
    let pg = Pg::start().await;
    pg.exec(&format!(
        "CREATE ROLE spool LOGIN PASSWORD '{PASSWORD}';
         CREATE SCHEMA pgspool AUTHORIZATION spool;
         CREATE TABLE ev (id int);
         GRANT INSERT ON ev TO spool;"
    ))
    .await;
    pg.server
        .set_hba("local all postgres trust\nlocal all all scram-sha-256\n")
        .expect("pg_hba.conf");
    let url = spool_url(&pg);
    wait_until("the server asks spool for a password", || async {
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err()
    })
    .await;
    pg
}

/// The URL of pgspool's role, without a password.
fn spool_url(pg: &Pg) -> String {
    pg.url().replace("user=postgres", "user=spool")
}

fn private_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `pgspool status --json` against the daemon's socket, as text.
fn status_text(socket: &Path, dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .arg("--wal-dir")
        .arg(dir.join("wal"))
        .output()
        .expect("run status");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn metrics_text(socket: &Path) -> String {
    client(socket)
        .await
        .get("/metrics")
        .await
        .expect("GET /metrics")
        .body
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn assert_secret_absent(what: &str, text: &str) {
    for secret in [PASSWORD, WRONG] {
        assert!(!text.contains(secret), "{what} shows a password:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_file_is_private_reloaded_and_never_shown() {
    let pg = server_asking_for_a_password().await;
    let dir = short_tempdir();
    let password_file = dir.path().join("pg-password");
    let config_file = dir.path().join("pgspool.toml");
    std::fs::write(
        &config_file,
        format!(
            "[postgres]\npassword_file = \"{}\"\nretry_max = \"200ms\"\nconnect_timeout = \"1s\"\n",
            password_file.display()
        ),
    )
    .expect("config");
    let args = ["--config", config_file.to_str().expect("utf-8")];

    // Readable by others: refused as a configuration error, the password not quoted.
    private_file(&password_file, &format!("{PASSWORD}\n"), 0o644);
    let mut refused = DaemonProcess::start(&[], dir.path(), &spool_url(&pg), &args);
    let status = refused.wait_exit().await;
    let log = refused.log_text();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains("password_file") && log.contains("chmod 600"),
        "{log}"
    );
    assert_secret_absent("the refusal", &log);
    drop(refused);

    // The wrong password: the daemon accepts rows, and says why PostgreSQL refuses it.
    private_file(&password_file, &format!("{WRONG}\n"), 0o600);
    let mut daemon = DaemonProcess::spawn(dir.path(), &spool_url(&pg), &args).await;
    let mut c = client(&daemon.socket).await;
    let reply = post_ndjson(&mut c, "ev", "{\"id\":1}\n{\"id\":2}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let (socket, root) = (daemon.socket.clone(), dir.path().to_path_buf());
    wait_until("status says the password was refused", || async {
        status_text(&socket, &root).contains("password authentication failed")
    })
    .await;
    let mut seen = vec![
        ("status --json", status_text(&socket, &root)),
        ("/metrics", metrics_text(&socket).await),
    ];

    // Rotated in the file, read again on SIGHUP: the rows land.
    private_file(&password_file, &format!("{PASSWORD}\n"), 0o600);
    let pid = Pid::from_raw(i32::try_from(daemon.pid()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGHUP).expect("SIGHUP");
    wait_until("the rows land with the new password", || async {
        pg.count("SELECT count(*) FROM ev").await == 2
    })
    .await;
    seen.push(("status --json", status_text(&socket, &root)));
    seen.push(("/metrics", metrics_text(&socket).await));
    assert!(daemon.terminate().await.success(), "{}", daemon.log_tail());
    seen.push(("the daemon's log", daemon.log_text()));
    assert!(
        seen.last()
            .is_some_and(|(_, log)| log.contains("password authentication failed")),
        "the log names the failure"
    );
    for (what, text) in &seen {
        assert_secret_absent(what, text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_pgpassfile_when_the_url_has_none() {
    let pg = server_asking_for_a_password().await;
    let dir = short_tempdir();
    let pgpass: PathBuf = dir.path().join("pgpass");
    private_file(
        &pgpass,
        &format!(
            "# other servers first\nelsewhere:5432:*:spool:nope\n{}:*:*:spool:{PASSWORD}\n",
            pg.server.socket_dir().display()
        ),
        0o600,
    );
    let mut daemon = DaemonProcess::start_with_env(
        &[],
        dir.path(),
        &spool_url(&pg),
        &[],
        &[("PGPASSFILE", pgpass.as_os_str())],
    );
    daemon.wait_ready().await;
    let mut c = client(&daemon.socket).await;
    let reply = post_ndjson(&mut c, "ev", "{\"id\":7}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    wait_until("the row lands with the password of PGPASSFILE", || async {
        pg.count("SELECT count(*) FROM ev").await == 1
    })
    .await;
    assert!(daemon.terminate().await.success(), "{}", daemon.log_tail());
    assert_secret_absent("the daemon's log", &daemon.log_text());

    // Readable by the group: ignored with a warning, as libpq does.
    private_file(&pgpass, &format!("*:*:*:spool:{PASSWORD}\n"), 0o640);
    let mut daemon = DaemonProcess::start_with_env(
        &[],
        dir.path(),
        &spool_url(&pg),
        &[],
        &[("PGPASSFILE", OsStr::new(&pgpass))],
    );
    daemon.wait_ready().await;
    let log_has = |text: &'static str| {
        let log = DaemonProcess::log_path(dir.path());
        move || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(text)
            }
        }
    };
    wait_until(
        "the log warns of the loose password file",
        log_has("group or world access"),
    )
    .await;
    assert!(daemon.terminate().await.success(), "{}", daemon.log_tail());
    assert_secret_absent("the daemon's log", &daemon.log_text());
}
