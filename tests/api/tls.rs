//! HTTPS: a certificate made at test time, HTTP/2 by ALPN (and HTTP/1.1 for a client that asks for
//! it) with a real client, the certificate replaced on disk and served without a restart, a handshake
//! that never comes closed like silent headers, and `prod` refusing plain HTTP on a reachable address.

use std::path::Path;
use std::time::{Duration, Instant};

use catraca::config::{Config, Mode, TlsFiles};
use catraca::executors::Kinds;
use catraca::startup::Server;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::helpers::{TestApp, echo, event_types, spawn_app_with};

/// A certificate authority of its own, and a certificate for 127.0.0.1 and localhost it signed.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("catraca test CA {name}"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Writes `pki`'s certificate and key where the gateway reads them (replacing a file as a renewal
/// tool does: write beside, then rename).
fn install(pki: &Pki, dir: &Path) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    for (path, text) in [(&files.cert, &pki.cert_pem), (&files.key, &pki.key_pem)] {
        let fresh = path.with_extension("new");
        std::fs::write(&fresh, text).unwrap();
        std::fs::rename(&fresh, path).unwrap();
    }
    files
}

/// A client that trusts only `ca_pem`.
fn client_trusting(ca_pem: &str, http1_only: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10));
    let builder = if http1_only {
        builder.http1_only()
    } else {
        builder
    };
    builder.build().unwrap()
}

fn https(app: &TestApp, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", app.addr.port())
}

async fn tls_app(files: TlsFiles, adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with(move |c| {
        c.tls = Some(files);
        adjust(c);
    })
    .await
}

#[tokio::test]
async fn https_speaks_http2_by_alpn_and_http1_to_a_client_that_asks_for_it() {
    // Arrange
    let certs = tempfile::tempdir().unwrap();
    let pki = pki("a");
    let app = tls_app(install(&pki, certs.path()), |_| {}).await;
    let key = app.admin_key().await;

    // Act: a governed request over HTTP/2, and one over HTTP/1.1.
    let h2 = client_trusting(&pki.ca_pem, false)
        .post(https(&app, "/process"))
        .header("x-api-key", &key)
        .header("x-trace-id", "tls-h2-0001")
        .json(&echo("over h2"))
        .send()
        .await
        .unwrap();
    let h1 = client_trusting(&pki.ca_pem, true)
        .get(https(&app, "/health"))
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(
        (h2.version(), h2.status().as_u16()),
        (reqwest::Version::HTTP_2, 200)
    );
    let answer: Value = h2.json().await.unwrap();
    assert_eq!(answer["status"], "SUCCESS", "{answer}");
    assert_eq!(
        event_types(&app.events("tls-h2-0001").await),
        [
            "REQUEST_START",
            "DECISION",
            "EXECUTOR_SELECTED",
            "ACTION_EXECUTED",
            "REQUEST_END"
        ]
    );
    assert_eq!(
        (h1.version(), h1.status().as_u16()),
        (reqwest::Version::HTTP_11, 200)
    );
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/health", app.addr.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP was answered: {:?}",
        plain.map(|r| r.status())
    );
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    // Arrange
    let certs = tempfile::tempdir().unwrap();
    let (old, new) = (pki("old"), pki("new"));
    let app = tls_app(install(&old, certs.path()), |_| {}).await;
    let health = |ca: &str| {
        // A new client per call: a fresh connection, a fresh handshake.
        let request = client_trusting(ca, true).get(https(&app, "/health")).send();
        async move { request.await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(health(&old.ca_pem).await.unwrap(), 200);
    assert!(health(&new.ca_pem).await.is_err(), "not yet renewed");

    // Act: a renewal tool replaces both files.
    install(&new, certs.path());

    // Assert: within a few reload intervals new handshakes present the new certificate.
    let deadline = Instant::now() + catraca::serve::TLS_RELOAD_EVERY * 4;
    while health(&new.ca_pem).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        health(&old.ca_pem).await.is_err(),
        "the old certificate is still served"
    );

    // A broken renewal (a key that is not the certificate's) keeps the working certificate.
    let other = pki("other");
    std::fs::write(certs.path().join("key.pem"), &other.key_pem).unwrap();
    tokio::time::sleep(catraca::serve::TLS_RELOAD_EVERY * 2).await;
    assert_eq!(health(&new.ca_pem).await.unwrap(), 200);
}

#[tokio::test]
async fn a_handshake_that_never_comes_is_closed_after_the_header_timeout() {
    let certs = tempfile::tempdir().unwrap();
    let app = tls_app(install(&pki("a"), certs.path()), |c| {
        c.http.header_timeout = Duration::from_secs(1);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the connection is closed, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
}

/// `Server::bind` with the example policies in `prod`, adjusted; only ever on loopback or refused
/// before it binds.
async fn bind(adjust: impl FnOnce(&mut Config)) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::defaults();
    config.database_url = catraca::config::DatabaseUrl::new(format!(
        "sqlite://{}",
        dir.path().join("catraca.db").display()
    ));
    config.audit_dir = dir.path().join("audit");
    config.policies_dir = crate::helpers::repo("policies");
    config.executors_dir = crate::helpers::repo("executors");
    config.mode = Mode::Prod;
    config.listen = "127.0.0.1:0".parse().unwrap();
    // prod signs its checkpoints with a key it is given.
    config.audit_signing_key = Some(catraca::config::KeySource::new(
        catraca::audit::anchor::SigningKey::generate("test").unwrap(),
    ));
    adjust(&mut config);
    let server = Server::bind(config, Kinds::builtin()).await;
    // The folder lives as long as the test needs the answer.
    std::mem::forget(dir);
    server
}

#[tokio::test]
async fn prod_refuses_to_start_without_a_checkpoint_signing_key_and_never_prints_one() {
    let refused = bind(|c| c.audit_signing_key = None)
        .await
        .err()
        .expect("prod without a signing key is refused");
    assert!(
        refused.to_string().contains("CATRACA_AUDIT_SIGNING_KEY"),
        "{refused:#}"
    );
    let key = catraca::audit::anchor::SigningKey::generate("test").unwrap();
    let mut config = Config::defaults();
    config.audit_signing_key = Some(catraca::config::KeySource::new(key.clone()));
    assert!(!format!("{config:?}").contains(&key));
}

#[tokio::test]
async fn prod_refuses_plain_http_on_a_reachable_address_unless_told_a_proxy_terminates_tls() {
    // Refused before anything is bound.
    let refused = bind(|c| c.listen = "0.0.0.0:0".parse().unwrap())
        .await
        .err()
        .expect("plain HTTP on 0.0.0.0 in prod is refused");
    let message = refused.to_string();
    assert!(
        message.contains("CATRACA_TLS_CERT") && message.contains("CATRACA_BEHIND_TLS_PROXY"),
        "{message}"
    );
    // Loopback, a proxy in front, or TLS of its own: each may start (the last two are checked
    // without binding a reachable address).
    assert!(bind(|_| {}).await.is_ok());
    let certs = tempfile::tempdir().unwrap();
    let files = install(&pki("a"), certs.path());
    let mut exposed = Config::defaults();
    exposed.mode = Mode::Prod;
    exposed.listen = "0.0.0.0:8000".parse().unwrap();
    assert!(exposed.check_exposure().is_err());
    exposed.behind_tls_proxy = true;
    assert!(exposed.check_exposure().is_ok());
    exposed.behind_tls_proxy = false;
    exposed.tls = Some(files.clone());
    assert!(exposed.check_exposure().is_ok());
    assert!(bind(|c| c.tls = Some(files)).await.is_ok());
    // TLS files that cannot be used stop the start, naming the file.
    let missing = bind(|c| {
        c.tls = Some(TlsFiles {
            cert: certs.path().join("absent.pem"),
            key: certs.path().join("key.pem"),
        });
    })
    .await
    .err()
    .expect("a missing certificate stops the start");
    assert!(missing.to_string().contains("absent.pem"), "{missing}");
}
