//! Who may connect: the socket file's mode and group, the `[listen]` allow-lists checked
//! with the peer's credentials (clients run as another user through `setpriv`), socket
//! activation, a stale socket file replaced while a live daemon's is not, and socket paths
//! too long for the platform.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::harness::{DaemonProcess, Pg, client, config, post_ndjson, short_tempdir, wait_until};

/// The uid and gid of `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// What a client running as `uid`:`gid` (no supplementary groups) gets for
/// `GET /healthz` on `socket`: `connect failed: ...` when it cannot connect, else its pid
/// on the first line and the raw HTTP answer after it.
async fn as_user(uid: u32, gid: u32, socket: &Path) -> String {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || as_user_blocking(uid, gid, &socket))
        .await
        .expect("the client panicked")
}

fn as_user_blocking(uid: u32, gid: u32, socket: &Path) -> String {
    let script = r#"
        use IO::Socket::UNIX;
        print "$$\n";
        my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or do { print "connect failed: $!\n"; exit 0 };
        print $s "GET /healthz HTTP/1.1\r\nhost: pgspool\r\nconnection: close\r\n\r\n";
        local $/; print <$s>;
    "#;
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--clear-groups", "perl", "-e", script])
        .arg(socket)
        .output()
        .expect("run perl through setpriv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lets every user reach sockets in `dir` (the socket's own mode then decides).
fn open_dir(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_0660_with_its_group_and_others_cannot_connect() {
    let pg = Pg::start().await;
    let dir = short_tempdir();
    open_dir(dir.path());
    let mut c = config(dir.path(), &pg.url());
    c.listen.group = Some("nogroup".into());
    let daemon = crate::harness::start_daemon(c.clone()).await;
    let meta = std::fs::metadata(&c.listen.socket).expect("the socket file");
    assert_eq!(meta.mode() & 0o7777, 0o660, "the default mode");
    assert_eq!(meta.gid(), NOBODY, "[listen] group = \"nogroup\"");
    // A user of the group connects; one outside it cannot.
    let member = as_user(NOBODY, NOBODY, &c.listen.socket).await;
    assert!(member.contains("HTTP/1.1 200"), "{member}");
    let stranger = as_user(NOBODY, 4242, &c.listen.socket).await;
    assert!(
        stranger.contains("connect failed: Permission denied"),
        "{stranger}"
    );
    daemon.stop().await.expect("stop");

    // [listen] mode is honoured as given, and an unknown group is a configuration error.
    c.listen.mode = 0o600;
    c.listen.group = None;
    let daemon = crate::harness::start_daemon(c.clone()).await;
    let meta = std::fs::metadata(&c.listen.socket).expect("the socket file");
    assert_eq!(meta.mode() & 0o7777, 0o600);
    let member = as_user(NOBODY, meta.gid(), &c.listen.socket).await;
    assert!(member.contains("connect failed"), "{member}");
    daemon.stop().await.expect("stop");
    c.listen.group = Some("no-such-group-here".into());
    let e = pgspool::app::Daemon::start(c)
        .await
        .expect_err("an unknown group");
    assert!(
        e.downcast_ref::<pgspool::config::ConfigError>().is_some(),
        "{e:#}"
    );
    assert!(format!("{e:#}").contains("no-such-group-here"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_allow_lists_get_403_a_log_line_and_a_count() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int)").await;
    let dir = short_tempdir();
    open_dir(dir.path());
    let file = dir.path().join("pgspool.toml");
    std::fs::write(
        &file,
        "[listen]\nmode = 0o666\nallowed_uids = [0]\nallowed_gids = [4242]\n",
    )
    .expect("write the config");
    let daemon = DaemonProcess::spawn(
        dir.path(),
        &pg.url(),
        &["--config", file.to_str().expect("utf-8")],
    )
    .await;
    // Allowed by uid (root: this test) and by gid.
    let mut c = client(&daemon.socket).await;
    assert_eq!(post_ndjson(&mut c, "t", "{\"id\":1}\n").await.status, 202);
    let by_gid = as_user(NOBODY, 4242, &daemon.socket).await;
    assert!(by_gid.contains("HTTP/1.1 200"), "{by_gid}");
    // Refused: 403 with a message naming the keys, and a log line with uid and pid.
    let refused = as_user(NOBODY, NOBODY, &daemon.socket).await;
    let (pid, answer) = refused.split_once('\n').expect("pid, then the answer");
    assert!(answer.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(answer.contains("uid 65534"), "{answer}");
    assert!(answer.contains("[listen] allowed_uids"), "{answer}");
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refused a connection"))
        .unwrap_or_else(|| panic!("no log line for the refusal: {}", daemon.log_tail()));
    assert!(line.contains("uid=65534"), "{line}");
    assert!(line.contains(&format!("pid={pid}")), "{line}");
    let metrics = c.get("/metrics").await.expect("metrics");
    let text = metrics.body.as_str().expect("text").to_string();
    assert!(
        text.contains("pgspool_requests_refused_total{reason=\"peer\"} 1\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_socket_activation_the_unit_owns_the_mode_and_the_allow_lists_still_apply() {
    let pg = Pg::start().await;
    let dir = short_tempdir();
    open_dir(dir.path());
    let file = dir.path().join("pgspool.toml");
    std::fs::write(&file, "[listen]\nmode = 0o600\nallowed_uids = [0]\n").expect("config");
    let activated = dir.path().join("activated.sock");
    let wrapper = [
        OsStr::new("systemd-socket-activate"),
        OsStr::new("-l"),
        activated.as_os_str(),
    ];
    let mut daemon = DaemonProcess::start(
        &wrapper,
        dir.path(),
        &pg.url(),
        &["--config", file.to_str().expect("utf-8")],
    );
    daemon.socket = activated.clone();
    // As SocketMode=0666 would make it.
    crate::harness::wait_until("systemd-socket-activate listens", || async {
        activated.exists()
    })
    .await;
    std::fs::set_permissions(&activated, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    daemon.wait_ready().await;
    let refused = as_user(NOBODY, NOBODY, &activated).await;
    assert!(refused.contains("HTTP/1.1 403"), "{refused}");
    let mode = std::fs::metadata(&activated).expect("socket").mode() & 0o7777;
    assert_eq!(mode, 0o666, "the socket unit's mode is left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_but_a_live_daemons_is_not() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int)").await;
    let dir = short_tempdir();
    let socket = dir.path().join("s.sock");
    // A daemon that is gone left its socket file.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let daemon = DaemonProcess::spawn(dir.path(), &pg.url(), &[]).await;
    // A second daemon on the same socket (another WAL) is refused before its WAL is made.
    let other = dir.path().join("other-wal");
    let run = |socket: &Path| {
        Command::new(env!("CARGO_BIN_EXE_pgspool"))
            .arg("run")
            .arg("--socket")
            .arg(socket)
            .arg("--wal-dir")
            .arg(&other)
            .args(["--database-url", &pg.url()])
            .output()
            .expect("run pgspool")
    };
    let out = run(&socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another process is listening on {}",
            socket.display()
        )),
        "{stderr}"
    );
    assert!(!other.exists(), "the WAL was touched");
    let mut c = client(&daemon.socket).await;
    assert_eq!(post_ndjson(&mut c, "t", "{\"id\":1}\n").await.status, 202);
    // A file that is not a socket is never removed.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").expect("write");
    let out = run(&file);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep me");
    // A path longer than sun_path is a configuration error (78) at validation.
    let long = dir.path().join("x".repeat(120));
    let out = run(&long);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("107 bytes"), "{stderr}");
}

/// Load: one row through a daemon started under umask 022 on a WAL directory it creates,
/// then one on a directory an operator made 0755. The first directory is 0700 and every
/// file pgspool wrote in it 0600 (its segments hold rows in clear text); for the second,
/// which pgspool leaves as it is, the log says what its mode means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_private_whatever_the_umask() {
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id int)").await;
    let umask_022: [&OsStr; 3] = [
        OsStr::new("sh"),
        OsStr::new("-c"),
        OsStr::new("umask 022; exec \"$0\" \"$@\""),
    ];
    let dir = short_tempdir();
    let mut daemon = DaemonProcess::start(&umask_022, dir.path(), &pg.url(), &[]);
    daemon.wait_ready().await;
    let mut c = client(&daemon.socket).await;
    assert_eq!(post_ndjson(&mut c, "t", "{\"id\":1}\n").await.status, 202);
    wait_until("the row lands", || async {
        pg.count("SELECT count(*) FROM t").await == 1
    })
    .await;
    let wal = dir.path().join("wal");
    let mode = |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&wal), 0o700, "{}", wal.display());
    let files: Vec<_> = std::fs::read_dir(&wal)
        .expect("list the WAL directory")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.extension() == Some(OsStr::new("wal"))),
        "{files:?}"
    );
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    daemon.terminate().await;
    assert!(!daemon.log_text().contains("open to other users"));

    let open = short_tempdir();
    let wal = open.path().join("wal");
    std::fs::create_dir(&wal).expect("mkdir");
    std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut daemon = DaemonProcess::start(&umask_022, open.path(), &pg.url(), &[]);
    daemon.wait_ready().await;
    daemon.terminate().await;
    let log = daemon.log_text();
    assert!(
        log.contains("the WAL directory is open to other users") && log.contains("mode=\"755\""),
        "{log}"
    );
}
