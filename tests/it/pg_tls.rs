//! TLS to PostgreSQL: `sslmode` and `sslrootcert` honoured as libpq does, against
//! throwaway servers listening on TCP with `ssl = on` and a certificate made here (a CA of
//! the test's own, a server certificate for `localhost` only), or with `ssl = off`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgspool::pg::{self, Target};
use pgspool::pgtemp::{Options, ServerTls, TempPostgres};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::harness::{
    client, config, connect, post_ndjson, short_tempdir, start_daemon, wait_until,
};

/// A CA, and a server certificate it signed for `localhost` (not for 127.0.0.1).
struct Certificates {
    ca_pem: String,
    server: ServerTls,
}

fn make_certificates(ca_name: &str) -> Certificates {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    Certificates {
        ca_pem: ca.pem(),
        server: ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    }
}

async fn start_server(tls: Option<ServerTls>) -> TempPostgres {
    tokio::task::spawn_blocking(move || TempPostgres::start_with(Options { tcp: true, tls }))
        .await
        .expect("start panicked")
        .expect("start PostgreSQL on TCP")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Connects with `url`: whether the session uses TLS, or the error's description.
async fn try_connect(url: &str) -> Result<bool, String> {
    let target = Target::parse(url, Duration::from_secs(5)).map_err(|e| format!("{e:#}"))?;
    let client = pg::connect(&target).await.map_err(|e| pg::describe(&e))?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_are_honoured_as_libpq_does() {
    let certs = make_certificates("pgspool test CA");
    let stranger = make_certificates("another CA");
    let server = start_server(Some(certs.server.clone())).await;
    let dir = short_tempdir();
    let ca = write(dir.path(), "ca.pem", &certs.ca_pem);
    let wrong_ca = write(dir.path(), "wrong-ca.pem", &stranger.ca_pem);
    let port = server.port();
    let url = |host: &str, mode: &str, root: &Path| {
        format!(
            "host={host} port={port} user=postgres dbname=postgres sslmode={mode} sslrootcert={}",
            root.display()
        )
    };
    let missing = dir.path().join("none.pem");

    // Encrypted without verifying: no root certificate file exists.
    assert_eq!(
        try_connect(&url("127.0.0.1", "require", &missing)).await,
        Ok(true)
    );
    assert_eq!(
        try_connect(&url("127.0.0.1", "prefer", &missing)).await,
        Ok(true)
    );
    assert_eq!(
        try_connect(&url("127.0.0.1", "disable", &missing)).await,
        Ok(false)
    );
    // The chain only: the certificate names localhost, not 127.0.0.1.
    assert_eq!(
        try_connect(&url("127.0.0.1", "verify-ca", &ca)).await,
        Ok(true)
    );
    // The chain and the name; as a URL too.
    assert_eq!(
        try_connect(&url("localhost", "verify-full", &ca)).await,
        Ok(true)
    );
    let as_url = format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        ca.display()
    );
    assert_eq!(try_connect(&as_url).await, Ok(true));

    let wrong_host = try_connect(&url("127.0.0.1", "verify-full", &ca))
        .await
        .expect_err("verify-full must check the host name");
    assert!(
        wrong_host.contains("not valid for name") && wrong_host.contains("sslrootcert"),
        "{wrong_host}"
    );
    for mode in ["verify-full", "verify-ca", "require"] {
        let host = if mode == "verify-full" {
            "localhost"
        } else {
            "127.0.0.1"
        };
        // require with a root certificate file checks the chain, as libpq does.
        let unknown = try_connect(&url(host, mode, &wrong_ca))
            .await
            .expect_err("a certificate from an unknown CA must be refused");
        assert!(
            unknown.contains("UnknownIssuer") && unknown.contains("TLS"),
            "{mode}: {unknown}"
        );
    }
    let no_file = try_connect(&url("localhost", "verify-full", &missing))
        .await
        .expect_err("verify-full without a root certificate");
    assert!(
        no_file.contains("does not exist") && no_file.contains("sslrootcert"),
        "{no_file}"
    );
}

/// A self-signed server certificate that is its own CA (`openssl req -x509`'s default),
/// which libpq accepts and rustls refuses: the error says so, and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_server_certificate_is_explained() {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    let server = start_server(Some(ServerTls {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }))
    .await;
    let dir = short_tempdir();
    let root = write(dir.path(), "self-signed.pem", &cert.pem());
    let url = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        server.port(),
        root.display()
    );
    let e = try_connect(&url).await.expect_err("rustls refuses it");
    assert!(
        e.contains("CaUsedAsEndEntity")
            && e.contains("give the server a certificate signed by a CA"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_fails_clearly_when_the_server_has_no_tls() {
    let server = start_server(None).await;
    let port = server.port();
    let url = |mode: &str| {
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={mode}")
    };
    let e = try_connect(&url("require"))
        .await
        .expect_err("sslmode=require against ssl=off");
    assert!(e.contains("server does not support TLS"), "{e}");
    assert_eq!(try_connect(&url("prefer")).await, Ok(false));
    // A Unix socket never uses TLS, whatever the mode (PostgreSQL offers none there).
    let socket = format!("{} sslmode=require", server.url());
    assert_eq!(try_connect(&socket).await, Ok(false));
}

/// The daemon loads its rows over TLS checked with verify-full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_loads_over_verified_tls() {
    let certs = make_certificates("pgspool test CA");
    let server = start_server(Some(certs.server.clone())).await;
    let admin = connect(&server.url()).await;
    admin
        .batch_execute("CREATE TABLE ev (id int, note text)")
        .await
        .expect("create");
    let dir = short_tempdir();
    let ca = write(dir.path(), "ca.pem", &certs.ca_pem);
    let url = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        server.port(),
        ca.display()
    );
    let daemon = start_daemon(config(dir.path(), &url)).await;
    let mut c = client(daemon.socket()).await;
    let reply = post_ndjson(&mut c, "ev", "{\"id\":1,\"note\":\"a\"}\n{\"id\":2}\n").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    wait_until("the rows land", || async {
        admin
            .query_one("SELECT count(*) FROM ev", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
            == 2
    })
    .await;
    let plain: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'pgspool' AND NOT s.ssl",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    let encrypted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'pgspool' AND s.ssl",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(
        encrypted >= 1 && plain == 0,
        "{encrypted} over TLS, {plain} plain"
    );
    daemon.stop().await.expect("stop");
}
