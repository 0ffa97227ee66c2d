//! The operators' console and the routes it reads: the page and its two files come from the binary
//! under a strict Content-Security-Policy; recent decisions are filtered and paged newest first; the
//! chains' page shows what the last `catraca audit verify` found; an admin lists and revokes keys.
//! Every one of these reads and changes is audited like the trail route.

use serde_json::{Value, json};

use crate::binary::Cli;
use crate::helpers::{TestApp, echo, event_types, key_id, reasons, spawn_app, unissued_key};

/// GET `path` with `key` as a bearer token (as the console sends it) and our own trace id.
async fn get_as(app: &TestApp, key: &str, path: &str, trace: &str) -> (u16, Value) {
    let resp = app
        .client
        .get(app.url(path))
        .bearer_auth(key)
        .header("x-trace-id", trace)
        .send()
        .await
        .unwrap();
    reasons(resp).await
}

/// The trace id of a /process answer.
fn trace_of(resp: &reqwest::Response) -> String {
    resp.headers()["x-trace-id"].to_str().unwrap().to_owned()
}

/// The traces of a page of decisions, in the page's order.
fn traces(page: &Value) -> Vec<&str> {
    page["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["trace_id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn the_console_comes_from_the_binary_under_a_policy_that_allows_this_origin_only() {
    let app = spawn_app().await;

    let page = app.client.get(app.url("/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();

    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(
        html.contains("/console/app.js") && html.contains("/console/console.css"),
        "{html}"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external asset: {html}"
    );
    for (file, kind) in [("app.js", "text/javascript"), ("console.css", "text/css")] {
        let resp = app
            .client
            .get(app.url(&format!("/console/{file}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{file}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{file}"
        );
        assert!(!resp.text().await.unwrap().is_empty(), "{file} is empty");
    }
    let (status, body) = reasons(
        app.client
            .get(app.url("/console/secrets.txt"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (404, Some("NOT_FOUND"))
    );
}

#[tokio::test]
async fn recent_decisions_are_filtered_and_paged_newest_first_and_each_read_is_audited() {
    // Arrange: allowed and refused requests, oldest first.
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let auditor = app.role_key("auditor").await;
    let analyst = app.role_key("analyst").await;
    let mut allowed = vec![];
    for _ in 0..3 {
        allowed.push(trace_of(&app.process(Some(&admin), &echo("x")).await));
    }
    let forbidden = json!({"action": "licitacoes.collect", "context_id": "work", "payload": {
        "source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-01-01",
        "data_final": "2026-01-02", "modalidade": 6}});
    let mut denied = vec![];
    for _ in 0..2 {
        let resp = app.process(Some(&analyst), &forbidden).await;
        assert_eq!(resp.status(), 403);
        denied.push(trace_of(&resp));
    }
    let stranger = unissued_key();
    let unknown = trace_of(&app.process(Some(&stranger), &echo("x")).await);

    // Act + Assert: denials only, newest first.
    let (status, page) = get_as(
        &app,
        &auditor,
        "/v1/audit/decisions?effect=deny",
        "decisions-read-0001",
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        traces(&page),
        [unknown.as_str(), &denied[1], &denied[0]],
        "{page}"
    );
    assert!(
        page["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["effect"] == "deny")
    );
    assert_eq!(page["next"], Value::Null, "the whole trail was read");

    // Each filter narrows by its own field.
    let (_, by_gate) = get_as(
        &app,
        &auditor,
        "/v1/audit/decisions?gate=auth&reason=AUTH_INVALID_KEY",
        "decisions-read-0002",
    )
    .await;
    assert_eq!(traces(&by_gate), [unknown.as_str()], "{by_gate}");
    assert_eq!(
        by_gate["decisions"][0]["key_id"],
        key_id(&stranger).to_string()
    );
    let analyst_id = key_id(&analyst).to_string();
    let (_, by_key) = get_as(
        &app,
        &auditor,
        &format!("/v1/audit/decisions?key_id={analyst_id}&action=licitacoes.collect"),
        "decisions-read-0003",
    )
    .await;
    assert_eq!(
        traces(&by_key),
        [denied[1].as_str(), &denied[0]],
        "{by_key}"
    );
    assert_eq!(by_key["decisions"][0]["gate"], "action_matrix");
    assert_eq!(by_key["decisions"][0]["role"], "analyst");

    // Pages of one follow each other through `next` without skipping or repeating.
    let mut seen = vec![];
    let mut path = "/v1/audit/decisions?effect=allow&action=echo&limit=1".to_owned();
    loop {
        let (status, page) = get_as(&app, &auditor, &path, "decisions-read-0004").await;
        assert_eq!(status, 200, "{page}");
        seen.extend(traces(&page).into_iter().map(str::to_owned));
        match page["next"].as_str() {
            Some(next) => {
                path = format!(
                    "/v1/audit/decisions?effect=allow&action=echo&limit=1&before={}",
                    next.replace(':', "%3A").replace('+', "%2B")
                )
            }
            None => break,
        }
    }
    allowed.reverse();
    assert_eq!(seen, allowed);

    // The reads are audited: an ALLOW of audit.read on this route, under the reader's trace id.
    let read = app.events("decisions-read-0001").await;
    assert_eq!(
        event_types(&read),
        ["REQUEST_START", "DECISION", "REQUEST_END"]
    );
    assert_eq!(read[0]["route"], "/v1/audit/decisions");
    assert_eq!(
        (read[1]["effect"].as_str(), read[1]["action"].as_str()),
        (Some("allow"), Some("audit.read"))
    );

    // Refusals: a role without audit.read, and parameters that cannot be read.
    let (status, body) = get_as(&app, &analyst, "/v1/audit/decisions", "decisions-read-0005").await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (403, Some("NO_MATCHING_RULE"))
    );
    for bad in [
        "limit=0",
        "limit=101",
        "limit=many",
        "before=yesterday",
        "effect=maybe",
        "gate=g9",
    ] {
        let (status, body) = get_as(
            &app,
            &auditor,
            &format!("/v1/audit/decisions?{bad}"),
            "decisions-read-0006",
        )
        .await;
        assert_eq!(
            (status, body["reason_codes"][0].as_str()),
            (400, Some("MALFORMED_REQUEST")),
            "{bad}: {body}"
        );
    }
}

#[tokio::test]
async fn the_chains_page_shows_the_last_verification_the_cli_made() {
    let app = spawn_app().await;
    let auditor = app.role_key("auditor").await;
    assert_eq!(app.process(Some(&auditor), &echo("x")).await.status(), 200);

    let (status, before) = get_as(&app, &auditor, "/v1/audit/chains", "chains-read-0001").await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(
        before["last_verification"],
        Value::Null,
        "never verified yet"
    );
    let chain = &before["chains"][0];
    assert!(
        chain["chain_id"].is_string() && chain["events"].as_i64().unwrap() >= 6,
        "{before}"
    );

    Cli::for_app(&app).run(&["audit", "verify", "--quiet"]);

    let (_, after) = get_as(&app, &auditor, "/v1/audit/chains", "chains-read-0002").await;
    let last = &after["last_verification"];
    assert_eq!(
        (last["ok"].as_bool(), last["source"].as_str()),
        (Some(true), Some("cli")),
        "{after}"
    );
    assert!(
        last["events"].as_i64().unwrap() >= chain["events"].as_i64().unwrap(),
        "{after}"
    );
    assert_eq!(last["failures"], json!([]));
    assert_eq!(
        event_types(&app.events("chains-read-0002").await),
        ["REQUEST_START", "DECISION", "REQUEST_END"]
    );
}

#[tokio::test]
async fn an_admin_lists_and_revokes_keys_and_the_revoked_key_is_refused_within_the_bound() {
    // Arrange
    let app = spawn_app().await;
    let admin = app.admin_key().await;
    let auditor = app.role_key("auditor").await;
    let analyst = app.role_key("analyst").await;
    let analyst_id = key_id(&analyst).to_string();
    let revoke = |key: &str, id: &str, body: Value, trace: &str| {
        let req = app
            .client
            .post(app.url(&format!("/v1/keys/{id}/revoke")))
            .bearer_auth(key)
            .header("x-trace-id", trace)
            .json(&body);
        async move { reasons(req.send().await.unwrap()).await }
    };

    // The list: every key, no secret and no hash.
    let (status, listed) = get_as(&app, &admin, "/v1/keys", "keys-read-0001").await;
    assert_eq!(status, 200, "{listed}");
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    assert!(
        keys.iter()
            .any(|k| k["key_id"] == analyst_id.as_str() && k["role"] == "analyst")
    );
    assert!(
        keys.iter()
            .all(|k| k.get("key").is_none() && k.get("secret_hash").is_none()),
        "{listed}"
    );
    let (status, body) = get_as(&app, &auditor, "/v1/keys", "keys-read-0002").await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (403, Some("NO_MATCHING_RULE"))
    );

    // Refusals change nothing: an auditor, no reason, a key that does not exist.
    let (status, _) = revoke(
        &auditor,
        &analyst_id,
        json!({"reason": "x"}),
        "keys-revoke-0001",
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = revoke(&admin, &analyst_id, json!({}), "keys-revoke-0002").await;
    assert_eq!(
        (status, body["reason_codes"][0].as_str()),
        (400, Some("MALFORMED_REQUEST"))
    );
    let (status, _) = revoke(
        &admin,
        "0123456789abcdef",
        json!({"reason": "x"}),
        "keys-revoke-0003",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(app.process(Some(&analyst), &echo("x")).await.status(), 200);

    // Act
    let (status, revoked) = revoke(
        &admin,
        &analyst_id,
        json!({"reason": "left the team"}),
        "keys-revoke-0004",
    )
    .await;

    // Assert: answered, audited before it was stored, and refused everywhere within the bound.
    assert_eq!(status, 200, "{revoked}");
    let admin_actor = format!("key:{}", key_id(&admin));
    assert_eq!(
        (revoked["key_id"].as_str(), revoked["revoked_by"].as_str()),
        (Some(analyst_id.as_str()), Some(admin_actor.as_str()))
    );
    let story = app.events("keys-revoke-0004").await;
    assert_eq!(
        event_types(&story),
        ["REQUEST_START", "DECISION", "KEY_REVOKED", "REQUEST_END"]
    );
    assert_eq!(story[1]["action"], "keys.manage");
    assert_eq!(
        (
            story[2]["key_id"].as_str(),
            story[2]["reason"].as_str(),
            story[2]["actor"].as_str()
        ),
        (
            Some(analyst_id.as_str()),
            Some("left the team"),
            Some(admin_actor.as_str())
        )
    );
    tokio::time::sleep(app.app.auth.keys().bound()).await;
    let (status, body) = reasons(app.process(Some(&analyst), &echo("x")).await).await;
    assert_eq!(
        (status, &body["reason_codes"]),
        (401, &json!(["AUTH_KEY_REVOKED"]))
    );
    let (_, listed) = get_as(&app, &admin, "/v1/keys", "keys-read-0003").await;
    let row = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == analyst_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(row["revoked_at"], revoked["revoked_at"]);
    let (status, _) = revoke(
        &admin,
        &analyst_id,
        json!({"reason": "again"}),
        "keys-revoke-0005",
    )
    .await;
    assert_eq!(status, 404, "a revoked key is not revoked twice");
}
