//! Key lifecycle and the auth gate's caches.

use std::time::Duration;

use catraca::domain::{ApiKey, KeyId};
use catraca::keys;

use crate::helpers::{KeySpec, echo, reasons, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_revoked_key_is_refused_on_the_very_next_request() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);

    let id: KeyId = ApiKey::parse(&key).unwrap().key_id().clone();
    keys::revoke(app.app.store.as_ref(), &app.app.audit, &id, "test")
        .await
        .unwrap();

    let (status, body) = reasons(app.process(Some(&key), &echo("x")).await).await;
    assert_eq!(status, 401);
    assert_eq!(body["reason_codes"][0], "AUTH_KEY_REVOKED");
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let app = spawn_app().await;
    let key = app
        .key(KeySpec {
            expires_in: Some(Duration::from_secs(1)),
            ..KeySpec::default()
        })
        .await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = reasons(app.process(Some(&key), &echo("x")).await).await;
    assert_eq!(status, 401);
    assert_eq!(body["reason_codes"][0], "AUTH_KEY_EXPIRED");
}

#[tokio::test]
async fn a_rotated_key_stops_working_and_its_replacement_works() {
    let app = spawn_app().await;
    let old = app.admin_key().await;
    let id = ApiKey::parse(&old).unwrap().key_id().clone();
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
    let (status, body) = reasons(app.process(Some(&old), &echo("x")).await).await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (401, Some("AUTH_KEY_REVOKED"))
    );
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

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = app.client.clone();
        let url = app.url("/process");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .header("x-api-key", key)
                .json(&echo("x"))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(app.app.auth.argon2_runs() - before, 1);
}

#[tokio::test]
async fn failed_attempts_from_one_address_stop_reaching_argon2() {
    let app = spawn_app_with(|c| c.auth_failures_per_minute = 3).await;
    let good = app.admin_key().await;
    let id = ApiKey::parse(&good).unwrap().key_id().clone();
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
