//! Key lifecycle and the auth gate's caches.

use std::time::{Duration, Instant};

use catraca::config::DatabaseUrl;
use catraca::domain::KeyId;
use catraca::keys;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::binary::Cli;
use crate::helpers::{KeySpec, TestApp, echo, key_id, reasons, spawn_app, spawn_app_with};

/// Asserts a refusal by the auth gate with `code`, in the body and in the trail's DECISION.
async fn assert_auth_refusal(app: &TestApp, resp: reqwest::Response, key_id: &KeyId, code: &str) {
    assert!(resp.headers().contains_key("www-authenticate"));
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let (status, body) = reasons(resp).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["gate"], "auth", "{body}");
    assert_eq!(body["reason_codes"], json!([code]), "{body}");
    let decision = app.decision(&trace).await;
    assert_eq!(decision["effect"], "deny", "{decision}");
    assert_eq!(decision["gate"], "auth", "{decision}");
    assert_eq!(decision["reason_codes"], json!([code]), "{decision}");
    assert_eq!(
        decision["presented_key_id"],
        key_id.to_string(),
        "{decision}"
    );
}

/// Sends requests with `key` to `app` from the moment a revocation was committed (`revoked`, taken
/// after the revoking call returned) until one is refused, and asserts the gateway's stated bound: no
/// request sent later than `revoked` + the bound is accepted, the refusal is a recorded
/// `AUTH_KEY_REVOKED`, and every request after it is refused too.
async fn assert_revoked_within_bound(app: &TestApp, key: &str, id: &KeyId, revoked: Instant) {
    let bound = app.app.auth.keys().bound();
    loop {
        let sent = revoked.elapsed();
        let resp = app.process(Some(key), &echo("x")).await;
        if resp.status() == 200 {
            assert!(
                sent <= bound,
                "accepted a request sent {sent:?} after the revocation; the bound is {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        assert_auth_refusal(app, resp, id, "AUTH_KEY_REVOKED").await;
        break;
    }
    for _ in 0..5 {
        let resp = app.process(Some(key), &echo("x")).await;
        assert_eq!(resp.status(), 401, "a revoked key passed again");
    }
}

/// The key's expiry as the store holds it.
async fn expiry_of(app: &TestApp, id: &KeyId) -> OffsetDateTime {
    let record = app.app.store.get_key(id).await.unwrap().unwrap();
    OffsetDateTime::parse(record.expires_at.as_deref().unwrap(), &Rfc3339).unwrap()
}

/// Sends requests with `key` to `app` until one is refused; returns how many were accepted and the
/// refusal. Every request sent before `expires_at` must be accepted, none sent after it, and the
/// refusal must not come before `expires_at`.
async fn poll_until_refused(
    app: &TestApp,
    key: &str,
    expires_at: OffsetDateTime,
) -> (usize, reqwest::Response) {
    // Far beyond any expiry a test sets: reaching it means the key never expired.
    let give_up = expires_at + time::Duration::seconds(30);
    let mut accepted = 0;
    loop {
        let sent = OffsetDateTime::now_utc();
        let resp = app.process(Some(key), &echo("x")).await;
        let answered = OffsetDateTime::now_utc();
        if resp.status() != 200 {
            assert!(
                answered >= expires_at,
                "refused at {answered}, before the expiry at {expires_at}"
            );
            return (accepted, resp);
        }
        assert!(
            sent < expires_at,
            "accepted a request sent at {sent}, after the expiry at {expires_at}"
        );
        assert!(answered < give_up, "still accepted at {answered}");
        accepted += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_revoked_key_is_refused_within_the_stated_bound() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);

    let id = key_id(&key);
    keys::revoke(app.app.store.as_ref(), &app.app.audit, &id, "test")
        .await
        .unwrap();
    let revoked = Instant::now();

    assert_revoked_within_bound(&app, &key, &id, revoked).await;
}

#[tokio::test]
async fn a_key_revoked_by_another_process_is_refused_within_the_bound_and_audited() {
    // Arrange: a key the gateway has verified (and cached, row and all).
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let id = key_id(&key);
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);

    // Act: the operator revokes it with the CLI, a process of its own.
    Cli::on(&app.db_url(), app.dir.path(), "cli").run(&["keys", "revoke", &id.to_string()]);
    let revoked = Instant::now();

    // Assert
    assert_revoked_within_bound(&app, &key, &id, revoked).await;
}

#[tokio::test]
async fn a_key_row_is_read_from_memory_while_the_revision_stands() {
    // Arrange: a key used after its creation was seen by the watcher (its row is cached).
    let app = spawn_app().await;
    let key = app.admin_key().await;
    tokio::time::sleep(app.app.auth.keys().bound()).await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);

    // Act: the row changes behind the gateway's back without moving the revision (a raw write with
    // the triggers that move it dropped), which no process of Catraca's ever does.
    let id = key_id(&key);
    app.raw_sql(&[
        "DROP TRIGGER api_keys_updated",
        &format!(
            "UPDATE api_keys SET revoked_at = '2000-01-01T00:00:00.000000Z' WHERE key_id = '{id}'"
        ),
    ])
    .await;

    // Assert: the gateway still serves from its cached row, so the store was not read per request...
    tokio::time::sleep(app.app.auth.keys().bound()).await;
    let (status, body) = reasons(app.process(Some(&key), &echo("x")).await).await;
    assert_eq!(status, 200, "{body}");
    // ...and the next real revision change brings the row in again.
    app.raw_sql(&["UPDATE key_revision SET revision = revision + 1"])
        .await;
    let moved = Instant::now();
    assert_revoked_within_bound(&app, &key, &id, moved).await;
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    // Arrange: a key that expires six seconds after it is made (room for argon2 on a loaded machine).
    let app = spawn_app().await;
    let key = app
        .key(KeySpec {
            expires_in: Some(Duration::from_secs(6)),
            ..KeySpec::default()
        })
        .await;
    let id = key_id(&key);
    let expires_at = expiry_of(&app, &id).await;

    // Act
    let (accepted, refusal) = poll_until_refused(&app, &key, expires_at).await;

    // Assert: used while valid, refused as expired after.
    assert!(
        accepted >= 1,
        "the key was never accepted before it expired"
    );
    assert_auth_refusal(&app, refusal, &id, "AUTH_KEY_EXPIRED").await;
}

#[tokio::test]
async fn a_key_created_to_expire_in_90_days_expires_90_days_from_now() {
    // Arrange
    let app = spawn_app().await;
    let cli = Cli::on(&app.db_url(), app.dir.path(), "cli");
    let before = OffsetDateTime::now_utc();

    // Act
    let out = cli.run(&[
        "keys",
        "create",
        "--name",
        "ana",
        "--role",
        "analyst",
        "--expires-in",
        "90d",
        "--json",
    ]);
    let after = OffsetDateTime::now_utc();

    // Assert: ninety days from the moment of creation, by the clock (timestamps keep microseconds).
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expires_at =
        OffsetDateTime::parse(created["expires_at"].as_str().unwrap(), &Rfc3339).unwrap();
    let ninety_days = time::Duration::days(90);
    let micro = time::Duration::microseconds(1);
    assert!(
        before + ninety_days - micro <= expires_at && expires_at <= after + ninety_days,
        "expires {expires_at}, created between {before} and {after}"
    );
    assert_eq!(
        expiry_of(&app, &key_id(created["key"].as_str().unwrap())).await,
        expires_at
    );
    let key = created["key"].as_str().unwrap();
    assert_eq!(app.process(Some(key), &echo("x")).await.status(), 200);
}

#[tokio::test]
async fn a_rotated_key_stops_working_and_its_replacement_works() {
    let app = spawn_app().await;
    let old = app.admin_key().await;
    let id = key_id(&old);
    let (new, record) = keys::rotate(
        app.app.store.as_ref(),
        &app.app.audit,
        &app.app.policy(),
        &id,
        None,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(record.rotated_from.as_ref(), Some(&id));
    let resp = app.process(Some(&old), &echo("x")).await;
    assert_auth_refusal(&app, resp, &id, "AUTH_KEY_REVOKED").await;
    assert_eq!(
        app.process(Some(&new.expose()), &echo("x")).await.status(),
        200
    );
}

#[tokio::test]
async fn argon2_runs_once_per_key_under_concurrent_load() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let before = app.app.auth.argon2_runs();

    let statuses = app.process_all_at_once(vec![key; 50]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(app.app.auth.argon2_runs() - before, 1);
}

#[tokio::test]
async fn failed_attempts_from_one_address_stop_reaching_argon2() {
    let app = spawn_app_with(|c| c.auth_failures_per_minute = 3).await;
    let good = app.admin_key().await;
    let id = key_id(&good);
    // Right key id, wrong secret: each attempt would cost an argon2 run.
    let wrong = format!("ck_{id}_{}", "0".repeat(64));
    let before = app.app.auth.argon2_runs();
    let mut throttled = None;
    for _ in 0..10 {
        let resp = app.process(Some(&wrong), &echo("x")).await;
        if resp.status() == 429 {
            throttled = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 401);
    }
    let resp = throttled.expect("failures were never throttled");
    assert!(resp.headers().contains_key("retry-after"));
    let (_, body) = reasons(resp).await;
    assert_eq!(body["gate"], "auth");
    assert_eq!(body["reason_codes"][0], "RATE_LIMITED");
    assert_eq!(
        app.app.auth.argon2_runs() - before,
        3,
        "only the budgeted failures ran argon2"
    );
}

#[tokio::test]
async fn after_the_default_thirty_failures_an_address_is_told_how_long_to_wait() {
    // Arrange: the default budget (the README's 30 failed verifications per address a minute).
    let app = spawn_app().await;
    let good = app.admin_key().await;
    let wrong = format!("ck_{}_{}", key_id(&good), "0".repeat(64));
    let before = app.app.auth.argon2_runs();

    // Act: wrong secrets until the address is throttled.
    let started = Instant::now();
    let mut throttled = None;
    for _ in 0..200 {
        let resp = app.process(Some(&wrong), &echo("x")).await;
        if resp.status() == 429 {
            throttled = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 401);
    }
    let elapsed = started.elapsed();

    // Assert: 30 verifications (plus the budget that refilled at 30 a minute meanwhile), then 429
    // with Retry-After for the next one, at most 60 s / 30 = 2 s away.
    let resp = throttled.expect("failures were never throttled");
    let runs = app.app.auth.argon2_runs() - before;
    let refilled = (elapsed.as_secs_f64() * 30.0 / 60.0).ceil() as u64;
    assert!(
        (30..=30 + refilled).contains(&runs),
        "{runs} verifications before throttling, in {elapsed:?}"
    );
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    let (status, body) = reasons(resp).await;
    assert_eq!(status, 429);
    assert_eq!(body["gate"], "auth", "{body}");
    assert_eq!(body["reason_codes"], json!(["RATE_LIMITED"]), "{body}");

    // Waiting the advertised time is enough for one more verification.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let runs = app.app.auth.argon2_runs();
    let (status, body) = reasons(app.process(Some(&wrong), &echo("x")).await).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["reason_codes"], json!(["AUTH_INVALID_KEY"]), "{body}");
    assert_eq!(app.app.auth.argon2_runs(), runs + 1);
}

/// Two gateways on one fresh PostgreSQL database, as two instances of a deployment would be.
async fn two_gateways_on_postgres() -> (String, TestApp, TestApp) {
    let url = crate::store::postgres_url().await;
    let on = |instance: &'static str| {
        let url = url.clone();
        move |c: &mut catraca::config::Config| {
            c.database_url = DatabaseUrl::new(url);
            c.instance_id = instance.into();
        }
    };
    let first = spawn_app_with(on("first")).await;
    let second = spawn_app_with(on("second")).await;
    (url, first, second)
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn a_key_revoked_from_another_process_is_refused_by_every_gateway_within_the_bound_on_postgres()
 {
    // Arrange: both gateways have verified (and cached) the key.
    let (url, first, second) = two_gateways_on_postgres().await;
    let key = first.admin_key().await;
    let id = key_id(&key);
    for app in [&first, &second] {
        assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
    }

    // Act: the CLI, a third process, revokes it.
    Cli::on(&url, first.dir.path(), "cli").run(&["keys", "revoke", &id.to_string()]);
    let revoked = Instant::now();

    // Assert: each gateway refuses it within the bound and records the refusal.
    for app in [&second, &first] {
        assert_revoked_within_bound(app, &key, &id, revoked).await;
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn a_key_revoked_through_one_gateway_is_refused_by_the_other_within_the_bound_on_postgres() {
    // Arrange
    let (_url, first, second) = two_gateways_on_postgres().await;
    let key = first.admin_key().await;
    let id = key_id(&key);
    assert_eq!(second.process(Some(&key), &echo("x")).await.status(), 200);

    // Act: revoked through the first gateway's key service.
    keys::revoke(first.app.store.as_ref(), &first.app.audit, &id, "test")
        .await
        .unwrap();
    let revoked = Instant::now();

    // Assert
    assert_revoked_within_bound(&second, &key, &id, revoked).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn a_key_made_by_one_gateway_expires_on_the_other_on_postgres() {
    // Arrange: a three-second key made through the first gateway.
    let (_url, first, second) = two_gateways_on_postgres().await;
    let key = first
        .key(KeySpec {
            expires_in: Some(Duration::from_secs(6)),
            ..KeySpec::default()
        })
        .await;
    let id = key_id(&key);
    let expires_at = expiry_of(&first, &id).await;

    // Act: the second gateway serves it until it is refused.
    let (accepted, refusal) = poll_until_refused(&second, &key, expires_at).await;

    // Assert
    assert!(
        accepted >= 1,
        "the key was never accepted before it expired"
    );
    assert_auth_refusal(&second, refusal, &id, "AUTH_KEY_EXPIRED").await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn a_revocation_is_pushed_to_the_other_gateway_long_before_its_next_poll_on_postgres() {
    // Arrange: gateways that poll only every 20 s, so only the push can explain a prompt refusal.
    let url = crate::store::postgres_url().await;
    let on = |instance: &'static str| {
        let url = url.clone();
        move |c: &mut catraca::config::Config| {
            c.database_url = DatabaseUrl::new(url);
            c.instance_id = instance.into();
            c.key_refresh = Duration::from_secs(20);
        }
    };
    let first = spawn_app_with(on("first")).await;
    let second = spawn_app_with(on("second")).await;
    let key = first.admin_key().await;
    let id = key_id(&key);
    assert_eq!(second.process(Some(&key), &echo("x")).await.status(), 200);

    // Act
    keys::revoke(first.app.store.as_ref(), &first.app.audit, &id, "test")
        .await
        .unwrap();
    let revoked = Instant::now();

    // Assert: refused within a fraction of the polling interval.
    loop {
        let resp = second.process(Some(&key), &echo("x")).await;
        if resp.status() == 401 {
            assert_auth_refusal(&second, resp, &id, "AUTH_KEY_REVOKED").await;
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "still accepted {:?} after the revocation: nothing was pushed",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
