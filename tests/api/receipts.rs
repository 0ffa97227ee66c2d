//! Decision receipts and their proofs: every answer names where its DECISION is in the trail, the
//! gateway proves it against a signed checkpoint, and anyone with the public key checks the proof
//! offline; forgeries are rejected. Checkpoints also reach a witness over HTTP.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catraca::audit::anchor::{PublicKey, SigningKey};
use catraca::audit::proof::{DecisionProof, verify_offline};
use serde_json::{Value, json};

use crate::binary::{Cli, printed};
use crate::helpers::{TestApp, echo, spawn_app, spawn_app_with};

/// The receipt in an answer's body, checked against the request's DECISION in the trail.
async fn receipt_matches_decision(app: &TestApp, body: &Value) {
    let receipt = &body["receipt"];
    let trace = body["trace_id"].as_str().unwrap();
    let decision = app.decision(trace).await;
    assert_eq!(receipt["chain_id"], decision["chain_id"], "{body}");
    assert_eq!(receipt["seq"], decision["seq"], "{body}");
    assert_eq!(receipt["hash"], decision["hash"], "{body}");
    assert_eq!(decision["decision_id"], body["decision_id"]);
}

#[tokio::test]
async fn every_answer_and_every_recorded_refusal_carries_its_decision_s_receipt() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let allowed = app.process(Some(&key), &echo("hello")).await;
    assert_eq!(allowed.status(), 200);
    receipt_matches_decision(&app, &allowed.json().await.unwrap()).await;
    // No key; an action the policy does not know; a context it does not know.
    for (key, body) in [
        (None, echo("x")),
        (
            Some(key.as_str()),
            json!({"action": "nope", "context_id": "work", "payload": {}}),
        ),
        (
            Some(key.as_str()),
            json!({"action": "echo", "context_id": "nowhere", "payload": {"message": "x"}}),
        ),
    ] {
        let refused = app.process(key, &body).await;
        assert!(refused.status().is_client_error(), "{}", refused.status());
        receipt_matches_decision(&app, &refused.json().await.unwrap()).await;
    }
    let analyst = app.role_key("analyst").await;
    let forbidden = app
        .process(
            Some(&analyst),
            &json!({"action": "keys.create", "payload": {}}),
        )
        .await;
    assert!(forbidden.status().is_client_error());
    receipt_matches_decision(&app, &forbidden.json().await.unwrap()).await;
}

/// The proof of `decision_id`, from the HTTP API, once a checkpoint covers it.
async fn proof_over_http(app: &TestApp, auditor: &str, decision_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app
            .client
            .get(app.url(&format!("/v1/audit/proofs/{decision_id}")))
            .header("X-API-Key", auditor)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        if status == 200 {
            return body;
        }
        assert_eq!(status, 404, "{body}");
        assert!(Instant::now() < deadline, "no proof: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn public_key_of(app: &TestApp) -> PublicKey {
    app.app.audit_public_key.clone()
}

#[tokio::test]
async fn a_proof_verifies_offline_and_a_forged_one_does_not() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let auditor = app.role_key("auditor").await;
    let mut decisions = Vec::new();
    for i in 0..5 {
        let r = app.process(Some(&key), &echo(&format!("m{i}"))).await;
        let body: Value = r.json().await.unwrap();
        decisions.push(body);
    }
    let served = app.get_json("/v1/audit/public-key").await;
    assert_eq!(served["public_key"], public_key_of(&app).as_str());
    assert_eq!(served["algorithm"], "ed25519");
    let public = PublicKey::from_text(served["public_key"].as_str().unwrap()).unwrap();

    let first = &decisions[1];
    let proof = proof_over_http(&app, &auditor, first["decision_id"].as_str().unwrap()).await;
    assert_eq!(proof["receipt"], first["receipt"]);
    let proof: DecisionProof = serde_json::from_value(proof).unwrap();
    let verified = verify_offline(&proof, &public).unwrap();
    assert_eq!(verified.event["decision_id"], first["decision_id"]);
    assert_eq!(verified.event["policy_revision"], first["policy_revision"]);
    assert_eq!(verified.event["effect"], "allow");

    // A receipt with a flipped byte.
    let mut flipped = proof.clone();
    let mut hash = flipped.receipt.hash.into_bytes();
    hash[10] = if hash[10] == b'0' { b'1' } else { b'0' };
    flipped.receipt.hash = String::from_utf8(hash).unwrap();
    assert!(verify_offline(&flipped, &public).is_err());
    // The proof of one decision presented for another's event and receipt.
    let other = proof_over_http(
        &app,
        &auditor,
        decisions[3]["decision_id"].as_str().unwrap(),
    )
    .await;
    let other: DecisionProof = serde_json::from_value(other).unwrap();
    let mut swapped = proof.clone();
    swapped.receipt = other.receipt.clone();
    swapped.event = other.event.clone();
    swapped.leaf_index = other.leaf_index;
    assert!(verify_offline(&swapped, &public).is_err());
    // The same checkpoint signed by another key: rejected with the gateway's key.
    let stranger = SigningKey::from_text(&SigningKey::generate("catraca").unwrap()).unwrap();
    let opened = public.open(&proof.checkpoint).unwrap();
    let mut resigned = proof.clone();
    resigned.checkpoint = stranger
        .sign(&opened.chain_id, opened.size, opened.root, opened.closed)
        .unwrap();
    assert!(verify_offline(&resigned, &public).is_err());
    // An event edited in the proof (another policy revision claimed).
    let mut edited = proof.clone();
    edited.event.body =
        edited
            .event
            .body
            .replacen("\"policy_revision\":\"", "\"policy_revision\":\"0", 1);
    assert!(verify_offline(&edited, &public).is_err());

    // The CLI checks the same files offline: 0 for the genuine proof, 2 for each forgery.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("public.key");
    std::fs::write(&key_file, public.as_str()).unwrap();
    for (name, p, code) in [
        ("genuine", &proof, 0),
        ("flipped", &flipped, 2),
        ("swapped", &swapped, 2),
        ("resigned", &resigned, 2),
    ] {
        let file = dir.path().join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_vec(p).unwrap()).unwrap();
        let out = Cli::new().output(&[
            "audit",
            "verify-receipt",
            &file.display().to_string(),
            "--public-key",
            &key_file.display().to_string(),
        ]);
        assert_eq!(out.status.code(), Some(code), "{name}: {}", printed(&out));
        if code == 0 {
            assert!(
                printed(&out).contains(first["policy_revision"].as_str().unwrap()),
                "{}",
                printed(&out)
            );
            assert!(printed(&out).contains("(allow)"), "{}", printed(&out));
        }
    }

    // `catraca audit prove` prints the same proof from the database.
    let out =
        Cli::for_app(&app).output(&["audit", "prove", first["decision_id"].as_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let printed_proof: DecisionProof = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed_proof.receipt, proof.receipt);
    verify_offline(&printed_proof, &public).unwrap();
}

#[tokio::test]
async fn proofs_need_audit_read_and_an_unknown_decision_is_not_found() {
    let app = spawn_app().await;
    let key = app.admin_key().await;
    let analyst = app.role_key("analyst").await;
    let auditor = app.role_key("auditor").await;
    let body: Value = app
        .process(Some(&key), &echo("x"))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/v1/audit/proofs/{}", body["decision_id"].as_str().unwrap());
    let refused = app
        .client
        .get(app.url(&path))
        .header("X-API-Key", &analyst)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let unknown = app
        .client
        .get(app.url("/v1/audit/proofs/01a24c62-8650-7454-b216-403da534cc0d"))
        .header("X-API-Key", &auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let nonsense = app
        .client
        .get(app.url("/v1/audit/proofs/not-a-decision"))
        .header("X-API-Key", &auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(nonsense.status(), 404);
}

/// A witness on loopback: a real HTTP server that keeps every body POSTed to it.
async fn witness() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = seen.clone();
    let router = axum::Router::new().route(
        "/add-checkpoint",
        axum::routing::post(move |body: String| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}/add-checkpoint"), seen)
}

#[tokio::test]
async fn each_checkpoint_reaches_the_witness_and_a_failing_witness_is_counted_not_an_outage() {
    let (url, seen) = witness().await;
    let app = spawn_app_with(|c| c.witness_url = Some(url)).await;
    let key = app.admin_key().await;
    let chain = app.app.audit.chain_id().to_owned();
    let public = public_key_of(&app);
    assert_eq!(app.process(Some(&key), &echo("seen")).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let opened = loop {
        let notes = seen.lock().unwrap().clone();
        let mine = notes
            .iter()
            .filter_map(|n| public.open(n).ok())
            .filter(|o| o.chain_id == chain)
            .max_by_key(|o| o.size);
        if let Some(o) = mine.filter(|o| o.size >= 4) {
            break o;
        }
        assert!(Instant::now() < deadline, "the witness got {notes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(opened.size >= 4);
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("catraca_witness_failures_total 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("catraca_checkpoints_total 0\n"),
        "{metrics}"
    );
    app.stop().await;

    // A witness that is not there: requests are answered as ever, the failures are counted.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = format!("http://{}/add-checkpoint", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn_app_with(|c| c.witness_url = Some(gone)).await;
    let key = app.admin_key().await;
    for i in 0..3 {
        assert_eq!(
            app.process(Some(&key), &echo(&format!("m{i}")))
                .await
                .status(),
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = app.get_text("/metrics").await;
        if !metrics.contains("catraca_witness_failures_total 0") {
            assert!(
                metrics.contains("catraca_witness_failures_total "),
                "{metrics}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no witness failure counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.get_json("/ready").await["status"], "ready");
}
