//! No key secret reaches a log, a metric or a response: every log target at `trace`, in the test
//! harness and in the real binary (`serve` in dev mode and the CLI). The one deliberate exception is a
//! new key, printed once where the command announces it.

use catraca::domain::ApiKey;
use catraca::gates::key_directory::{DEFAULT_REFRESH, STALE_AFTER_REFRESHES};
use catraca::keys;
use serde_json::Value;

use crate::binary::{self, Cli, Serve};
use crate::helpers::{captured_logs, echo, key_id, spawn_app, unissued_key, wrong_secret_for};

/// The secret half of a full key (`ck_<key_id>_<secret>`).
fn secret(key: &str) -> String {
    ApiKey::parse(key).unwrap().secret().to_owned()
}

/// Status line, headers and body of a response, as one text to search.
async fn seen(resp: reqwest::Response) -> String {
    let mut text = format!("{}\n", resp.status());
    for (name, value) in resp.headers() {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push_str(&resp.text().await.unwrap());
    text
}

/// Fails if any of `secrets` (named) occurs in `text` (named `place`).
fn assert_none_in(place: &str, text: &str, secrets: &[(&str, String)]) {
    for (name, secret) in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "the secret of the {name} key is in {place}"
        );
    }
}

#[tokio::test]
async fn no_key_secret_reaches_any_log_target_the_metrics_or_a_response() {
    // Arrange: keys of every state a request can present.
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let auditor = app.role_key("auditor").await;
    let revoked = app.admin_key().await;
    keys::revoke(
        app.app.store.as_ref(),
        &app.app.audit,
        &key_id(&revoked),
        "test",
    )
    .await
    .unwrap();
    let wrong = wrong_secret_for(&admin);
    let unissued = unissued_key();
    // Not a key at all, though it carries a secret-shaped text.
    let malformed_secret = secret(&unissued_key());
    let malformed = format!("ck_{malformed_secret}");

    // Act: each key through both headers, a trace read, and the metrics.
    let trace_id = "secrets-in-process-0001";
    let mut responses = Vec::new();
    for key in [&admin, &auditor, &revoked, &wrong, &unissued, &malformed] {
        let by_header = app
            .client
            .post(app.url("/process"))
            .header("x-api-key", key.as_str())
            .header("x-trace-id", trace_id)
            .json(&echo("x"))
            .send()
            .await
            .unwrap();
        responses.push(seen(by_header).await);
        let by_bearer = app
            .client
            .post(app.url("/process"))
            .bearer_auth(key)
            .json(&echo("x"))
            .send()
            .await
            .unwrap();
        responses.push(seen(by_bearer).await);
    }
    let trail = app
        .client
        .get(app.url(&format!("/v1/audit/traces/{trace_id}")))
        .header("x-api-key", auditor.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(trail.status(), 200);
    responses.push(seen(trail).await);
    let metrics = app.get_text("/metrics").await;
    app.stop().await;
    let logs = captured_logs();

    // Assert: the capture saw this test's requests and more than Catraca's own targets...
    assert!(logs.contains(trace_id), "the log capture missed this test");
    assert!(
        logs.contains(" sqlx::query: "),
        "a dependency's target (the database driver's) was not captured"
    );
    // ...and no secret is anywhere in what it saw.
    let secrets = [
        ("admin", secret(&admin)),
        ("auditor", secret(&auditor)),
        ("revoked", secret(&revoked)),
        ("wrongly presented", secret(&wrong)),
        ("never issued", secret(&unissued)),
        ("malformed", malformed_secret),
    ];
    assert_none_in("the logs", &logs, &secrets);
    assert_none_in("/metrics", &metrics, &secrets);
    for response in &responses {
        assert_none_in(&format!("a response:\n{response}"), response, &secrets);
    }
}

/// The README's dev-mode announcement, and the key printed under it.
const ANNOUNCEMENT: &str = "dev mode: created an admin key";

fn announced_key(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines().skip_while(|l| !l.contains(ANNOUNCEMENT));
    lines.next()?;
    let key = lines.find(|l| !l.trim().is_empty())?.trim();
    key.starts_with("ck_").then(|| key.to_owned())
}

/// A tracing record starts with its RFC 3339 timestamp (`2026-…`); the announcement's lines do not.
fn is_log_record(line: &str) -> bool {
    line.get(..5)
        .is_some_and(|head| head[..4].bytes().all(|b| b.is_ascii_digit()) && head.ends_with('-'))
}

/// The lines of the announcement: from its first line up to the next log record.
fn announcement_lines(stderr: &str) -> std::ops::Range<usize> {
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains(ANNOUNCEMENT))
        .expect("no dev-mode announcement");
    let end = (start + 1..lines.len())
        .find(|i| is_log_record(lines[*i]))
        .unwrap_or(lines.len());
    start..end
}

fn plain_text(out: &[u8]) -> String {
    binary::strip_ansi(&String::from_utf8_lossy(out))
}

/// Runs a CLI command; checks that neither of its streams shows any of `secrets`; returns them.
fn cli(cli: &Cli, args: &[&str], secrets: &[(&str, String)]) -> (String, String) {
    let out = cli.run(args);
    let (stdout, stderr) = (plain_text(&out.stdout), plain_text(&out.stderr));
    let command = args.join(" ");
    assert_none_in(
        &format!("the stdout of catraca {command}"),
        &stdout,
        secrets,
    );
    assert_none_in(
        &format!("the stderr of catraca {command}"),
        &stderr,
        secrets,
    );
    (stdout, stderr)
}

/// A key command printed its new `key` once, on stdout, and not on stderr.
fn printed_once(command: &str, (stdout, stderr): &(String, String), key: &str) {
    let secret = secret(key);
    assert_eq!(
        stdout.matches(secret.as_str()).count(),
        1,
        "catraca {command}: {stdout}"
    );
    assert!(
        !stderr.contains(&secret),
        "catraca {command} put the new key on stderr: {stderr}"
    );
}

/// The `key` field of a `--json` key command.
fn json_key(stdout: &str) -> String {
    let v: Value = serde_json::from_str(stdout).unwrap();
    v["key"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn serve_and_the_cli_print_a_key_only_once_where_they_announce_it() {
    // Arrange: a fresh dev-mode installation, logging every target at trace.
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let db = format!("sqlite://{}", cwd.join("catraca.db").display());
    let at_trace_in_dev = |instance: &str| {
        Cli::on(&db, cwd, instance)
            .env("CATRACA_LOG", "trace")
            .env("CATRACA_MODE", "dev")
    };
    let env = at_trace_in_dev("serve");
    let cli_env = at_trace_in_dev("cli");
    let client = reqwest::Client::new();
    let post = |serve: &Serve, key: &str, trace: &str| {
        client
            .post(serve.url("/process"))
            .header("x-api-key", key)
            .header("x-trace-id", trace)
            .json(&echo("x"))
            .send()
    };

    // Act, 1: the first start creates and announces the admin key.
    let serve = Serve::start(&env);
    serve.wait_for_stderr("the dev-mode key", |e| announced_key(e).is_some());
    let admin = announced_key(&serve.stderr()).unwrap();
    let wrong = wrong_secret_for(&admin);
    let unissued = unissued_key();
    let mut secrets = vec![
        ("admin", secret(&admin)),
        ("wrongly presented", secret(&wrong)),
        ("never issued", secret(&unissued)),
    ];
    let mut responses = Vec::new();
    let resp = post(&serve, &admin, "secrets-binary-trace-01")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    responses.push(seen(resp).await);

    // Act, 2: the key lifecycle through the CLI, each new key used on the running server.
    let created = cli(
        &cli_env,
        &[
            "keys", "create", "--name", "ana", "--role", "analyst", "--json",
        ],
        &secrets,
    );
    let second = json_key(&created.0);
    printed_once("keys create --json", &created, &second);
    secrets.push(("created", secret(&second)));
    let plain = cli(
        &cli_env,
        &["keys", "create", "--name", "bia", "--role", "auditor"],
        &secrets,
    );
    let third = plain.0.trim().to_owned();
    printed_once("keys create", &plain, &third);
    secrets.push(("created as a plain line", secret(&third)));
    let resp = post(&serve, &second, "secrets-binary-trace-02")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    responses.push(seen(resp).await);

    let rotation = cli(
        &cli_env,
        &["keys", "rotate", &key_id(&second).to_string(), "--json"],
        &secrets,
    );
    let rotated = json_key(&rotation.0);
    printed_once("keys rotate --json", &rotation, &rotated);
    secrets.push(("rotated", secret(&rotated)));
    tokio::time::sleep(DEFAULT_REFRESH * STALE_AFTER_REFRESHES).await;
    for (key, want) in [(&second, 401), (&rotated, 200)] {
        let resp = post(&serve, key, "secrets-binary-trace-03").await.unwrap();
        assert_eq!(resp.status(), want);
        responses.push(seen(resp).await);
    }
    cli(
        &cli_env,
        &["keys", "revoke", &key_id(&rotated).to_string()],
        &secrets,
    );
    // A key change by another process reaches the gateway within its stated bound.
    tokio::time::sleep(DEFAULT_REFRESH * STALE_AFTER_REFRESHES).await;
    for key in [&rotated, &wrong, &unissued] {
        let resp = post(&serve, key, "secrets-binary-trace-04").await.unwrap();
        assert_eq!(resp.status(), 401);
        responses.push(seen(resp).await);
    }
    let metrics = client
        .get(serve.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for args in [
        &["keys", "list"][..],
        &["keys", "list", "--json"],
        &["audit", "trace", "secrets-binary-trace-01"],
        &["audit", "trace", "secrets-binary-trace-04", "--json"],
        &["audit", "export", "--since", "2000-01-01"],
        &[
            "audit",
            "export",
            "--since",
            "2000-01-01",
            "--format",
            "csv",
        ],
        &["audit", "verify"],
    ] {
        cli(&cli_env, args, &secrets);
    }
    let (stdout, stderr) = serve.stop();

    // Act, 3: a second start finds a key and announces nothing.
    let again = Serve::start(&env);
    let resp = post(&again, &admin, "secrets-binary-trace-05")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the announced key is the stored one");
    let (again_stdout, again_stderr) = again.stop();

    // Assert: the trace-level log of the first server covered the requests...
    assert!(
        stderr.contains("secrets-binary-trace-01") && stderr.contains(" sqlx::query: "),
        "serve did not log every target at trace:\n{stderr}"
    );
    // ...the admin key is printed once, in the announcement, and nowhere else...
    assert_eq!(stderr.matches(ANNOUNCEMENT).count(), 1, "{stderr}");
    let block = announcement_lines(&stderr);
    let admin_secret = secret(&admin);
    for (i, line) in stderr.lines().enumerate() {
        if line.contains(&admin_secret) {
            assert!(
                block.contains(&i),
                "the admin key outside the announcement, line {i}: {line}"
            );
        }
    }
    assert_none_in("the stdout of serve", &stdout, &secrets);
    let others: Vec<(&str, String)> = secrets[1..].to_vec();
    assert_none_in("the stderr of serve", &stderr, &others);
    // ...not again at the next start...
    assert!(!again_stderr.contains(ANNOUNCEMENT), "{again_stderr}");
    assert_none_in("the stdout of the second serve", &again_stdout, &secrets);
    assert_none_in("the stderr of the second serve", &again_stderr, &secrets);
    // ...and never in a response or the metrics.
    assert_none_in("/metrics", &metrics, &secrets);
    for response in &responses {
        assert_none_in(&format!("a response:\n{response}"), response, &secrets);
    }
}
