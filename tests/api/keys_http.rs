//! Keys over HTTP: made, rotated, listed and revoked through the gateway, governed by the action matrix
//! and audited like the CLI's key commands; a key never hands out more than it holds.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    KeySpec, TestApp, echo, event_types, key_id, reasons, spawn_app, spawn_app_with,
};

/// POSTs `body` to `path` with `key`, under the trace id `trace`.
async fn post_as(app: &TestApp, key: &str, path: &str, body: &Value, trace: &str) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url(path))
        .bearer_auth(key)
        .header("x-trace-id", trace)
        .json(body)
        .send()
        .await
        .unwrap();
    reasons(resp).await
}

async fn key_count(app: &TestApp) -> usize {
    app.app.store.list_keys().await.unwrap().len()
}

/// Makes an analyst key through the API as an admin, uses it, rotates it, and checks the trail.
async fn an_admin_makes_and_rotates_a_key(app: TestApp) {
    let admin = app.admin_key().await;
    let admin_actor = format!("key:{}", key_id(&admin));

    // Make: answered once with the secret, audited before it was stored, usable at once.
    let (status, made) = post_as(
        &app,
        &admin,
        "/v1/keys",
        &json!({"name": "ana", "role": "analyst", "contexts": ["work"], "expires_in": "30d"}),
        "keys-make-0001",
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let secret = made["key"].as_str().unwrap().to_owned();
    assert_eq!(made["key_id"], key_id(&secret).to_string());
    assert_eq!(
        (
            &made["role"],
            &made["contexts"],
            &made["tier"],
            &made["created_by"]
        ),
        (
            &json!("analyst"),
            &json!(["work"]),
            &json!("standard"),
            &json!(admin_actor)
        )
    );
    assert!(made["expires_at"].is_string(), "{made}");
    let story = app.events("keys-make-0001").await;
    assert_eq!(
        event_types(&story),
        ["REQUEST_START", "DECISION", "KEY_CREATED", "REQUEST_END"]
    );
    assert_eq!(
        (&story[1]["action"], &story[1]["effect"]),
        (&json!("keys.create"), &json!("allow"))
    );
    assert_eq!(
        (&story[2]["key_id"], &story[2]["actor"], &story[2]["role"]),
        (&made["key_id"], &json!(admin_actor), &json!("analyst"))
    );
    assert_eq!(story[3]["status"], 201);
    let trail = serde_json::to_string(&story).unwrap();
    let secret_part = secret.rsplit('_').next().unwrap();
    assert!(
        !trail.contains(secret_part),
        "the secret never reaches the trail"
    );
    assert_eq!(app.process(Some(&secret), &echo("x")).await.status(), 200);

    // Rotate: a new secret for the same grant; the old one is refused within the bound.
    let id = made["key_id"].as_str().unwrap();
    let (status, rotated) = post_as(
        &app,
        &admin,
        &format!("/v1/keys/{id}/rotate"),
        &json!({}),
        "keys-rotate-0001",
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let replacement = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            &rotated["rotated_from"],
            &rotated["role"],
            &rotated["contexts"],
            &rotated["name"]
        ),
        (
            &json!(id),
            &json!("analyst"),
            &json!(["work"]),
            &json!("ana")
        )
    );
    assert_eq!(
        rotated["expires_at"],
        Value::Null,
        "a rotated key starts afresh"
    );
    assert_eq!(
        event_types(&app.events("keys-rotate-0001").await),
        [
            "REQUEST_START",
            "DECISION",
            "KEY_CREATED",
            "KEY_REVOKED",
            "REQUEST_END"
        ]
    );
    assert_eq!(
        app.process(Some(&replacement), &echo("x")).await.status(),
        200
    );
    tokio::time::sleep(app.app.auth.keys().bound()).await;
    let (status, body) = reasons(app.process(Some(&secret), &echo("x")).await).await;
    assert_eq!(
        (status, &body["reason_codes"]),
        (401, &json!(["AUTH_KEY_REVOKED"]))
    );

    // Rotating what is no longer active is a 404, and changes nothing.
    let before = key_count(&app).await;
    let (status, _) = post_as(
        &app,
        &admin,
        &format!("/v1/keys/{id}/rotate"),
        &json!({}),
        "keys-rotate-0002",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(key_count(&app).await, before);
}

#[tokio::test]
async fn an_admin_makes_and_rotates_a_key_over_http() {
    an_admin_makes_and_rotates_a_key(spawn_app().await).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn an_admin_makes_and_rotates_a_key_over_http_on_postgres() {
    let url = crate::store::postgres_url().await;
    let app = spawn_app_with(|c| c.database_url = catraca::config::DatabaseUrl::new(url)).await;
    an_admin_makes_and_rotates_a_key(app).await;
}

/// A role without `keys.create`, bodies that cannot be read and names the policy lacks: refused,
/// nothing made.
async fn refusals_make_nothing(app: TestApp) {
    let admin = app.admin_key().await;
    let auditor = app.role_key("auditor").await;
    let before = key_count(&app).await;

    let (status, body) = post_as(
        &app,
        &auditor,
        "/v1/keys",
        &json!({"name": "x", "role": "auditor"}),
        "keys-make-0101",
    )
    .await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (403, Some("NO_MATCHING_RULE"))
    );
    let auditor_id = key_id(&auditor).to_string();
    let (status, _) = post_as(
        &app,
        &auditor,
        &format!("/v1/keys/{auditor_id}/rotate"),
        &json!({}),
        "keys-rotate-0101",
    )
    .await;
    assert_eq!(status, 403);

    for (i, bad) in [
        json!({"role": "analyst"}),
        json!({"name": "x", "role": "analyst", "secret": "mine"}),
        json!({"name": "x", "role": "Not A Role"}),
        json!({"name": "x", "role": "superuser"}),
        json!({"name": "x", "role": "analyst", "contexts": ["elsewhere"]}),
        json!({"name": "x", "role": "analyst", "tier": "gold"}),
        json!({"name": "x", "role": "analyst", "expires_in": "soon"}),
        json!({"name": "", "role": "analyst"}),
        json!(["not", "an", "object"]),
    ]
    .iter()
    .enumerate()
    {
        let trace = format!("keys-make-02{i:02}");
        let (status, body) = post_as(&app, &admin, "/v1/keys", bad, &trace).await;
        assert_eq!(
            (status, body["reason_codes"][0].as_str()),
            (400, Some("MALFORMED_REQUEST")),
            "{bad}: {body}"
        );
    }
    assert_eq!(key_count(&app).await, before);
}

#[tokio::test]
async fn refusals_over_http_make_no_key() {
    refusals_make_nothing(spawn_app().await).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn refusals_over_http_make_no_key_on_postgres() {
    let url = crate::store::postgres_url().await;
    let app = spawn_app_with(|c| c.database_url = catraca::config::DatabaseUrl::new(url)).await;
    refusals_make_nothing(app).await;
}

/// An operator (allowed `keys.create` by the test policy) tries to hand out more than it holds.
async fn escalation_is_refused(app: TestApp) {
    let operator = app
        .key(KeySpec {
            role: "operator",
            tier: "standard",
            contexts: &["work"],
            expires_in: Some(Duration::from_secs(3600)),
        })
        .await;
    let admin = app.admin_key().await;
    let admin_id = key_id(&admin).to_string();
    let before = key_count(&app).await;

    for (i, (ask, why)) in [
        (
            json!({"name": "x", "role": "admin", "contexts": ["work"], "expires_in": "30m"}),
            "admins-everything",
        ),
        (
            json!({"name": "x", "role": "auditor", "contexts": ["work"], "expires_in": "30m"}),
            "audit.read",
        ),
        (
            json!({"name": "x", "role": "analyst", "expires_in": "30m"}),
            "every context",
        ),
        (
            json!({"name": "x", "role": "analyst", "contexts": ["work", "partner"], "expires_in": "30m"}),
            "partner",
        ),
        (
            json!({"name": "x", "role": "analyst", "contexts": ["work"], "tier": "bulk", "expires_in": "30m"}),
            "tier bulk",
        ),
        (
            json!({"name": "x", "role": "analyst", "contexts": ["work"]}),
            "expire no later",
        ),
        (
            json!({"name": "x", "role": "analyst", "contexts": ["work"], "expires_in": "2h"}),
            "expire no later",
        ),
    ]
    .iter()
    .enumerate()
    {
        let trace = format!("keys-escalate-{i:04}");
        let (status, body) = post_as(&app, &operator, "/v1/keys", ask, &trace).await;
        assert_eq!(
            (status, body["reason_codes"][0].as_str()),
            (403, Some("ACTION_FORBIDDEN")),
            "{ask}: {body}"
        );
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(why), "{ask}: {message}");
        // The refusal is a recorded deny at the action matrix, and nothing else happened.
        let story = app.events(&trace).await;
        assert_eq!(
            event_types(&story),
            ["REQUEST_START", "DECISION", "REQUEST_END"],
            "{ask}"
        );
        assert_eq!(
            (&story[1]["effect"], &story[1]["gate"], &story[1]["reason_codes"]),
            (&json!("deny"), &json!("action_matrix"), &json!(["ACTION_FORBIDDEN"]))
        );
    }
    // Nor may it take over a stronger key by rotating it.
    let (status, body) = post_as(
        &app,
        &operator,
        &format!("/v1/keys/{admin_id}/rotate"),
        &json!({"expires_in": "30m"}),
        "keys-escalate-0100",
    )
    .await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (403, Some("ACTION_FORBIDDEN")),
        "{body}"
    );
    assert_eq!(key_count(&app).await, before);
    assert_eq!(app.process(Some(&admin), &echo("x")).await.status(), 200);

    // Within what it holds, it may: a role it inherits, its context, a tier no larger, a shorter life.
    let (status, made) = post_as(
        &app,
        &operator,
        "/v1/keys",
        &json!({"name": "ana", "role": "analyst", "contexts": ["work"], "tier": "standard", "expires_in": "30m"}),
        "keys-escalate-0200",
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let analyst = made["key"].as_str().unwrap().to_owned();
    assert_eq!(app.process(Some(&analyst), &echo("x")).await.status(), 200);
    let analyst_id = key_id(&analyst).to_string();
    let (status, rotated) = post_as(
        &app,
        &operator,
        &format!("/v1/keys/{analyst_id}/rotate"),
        &json!({"expires_in": "10m"}),
        "keys-escalate-0201",
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
}

#[tokio::test]
async fn a_key_cannot_make_or_rotate_a_key_holding_more_than_itself() {
    escalation_is_refused(spawn_app().await).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn a_key_cannot_make_or_rotate_a_key_holding_more_than_itself_on_postgres() {
    let url = crate::store::postgres_url().await;
    let app = spawn_app_with(|c| c.database_url = catraca::config::DatabaseUrl::new(url)).await;
    escalation_is_refused(app).await;
}
