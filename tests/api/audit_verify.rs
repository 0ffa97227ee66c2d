//! Verification of the trail: intact across restarts, and each tamper case detected and named, done as
//! an intruder with file access would (append-only triggers dropped first).

use std::sync::Arc;

use catraca::audit::chain_hash;
use catraca::audit::verify::{Problem, verify_store};
use catraca::config::DatabaseUrl;
use catraca::store::{SqliteStore, Store};
use serde_json::{Value, json};
use sqlx::{Connection, Row, SqliteConnection};

use crate::helpers::{echo, spawn_app, spawn_app_with};

/// Two gateway runs on one database (two linked chains), some allowed and some refused requests.
/// Returns the folder (keeping the files alive) and the database URL.
async fn trail() -> (tempfile::TempDir, String) {
    let first = spawn_app().await;
    let key = first.admin_key().await;
    for i in 0..4 {
        first.process(Some(&key), &echo(&format!("m{i}"))).await;
        first.process(None, &echo("x")).await;
    }
    let url = first.db_url();
    let dir = first.stop().await;
    let second = spawn_app_with(|c| c.database_url = DatabaseUrl::new(url.clone())).await;
    second.process(Some(&key), &echo("again")).await;
    second.stop().await;
    (dir, url)
}

async fn verify(url: &str) -> Option<(Problem, String, i64)> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(url).await.unwrap());
    let report = verify_store(store.as_ref(), |_| {}).await.unwrap();
    assert!(report.events > 0);
    report.finding.map(|f| (f.problem, f.chain_id, f.seq))
}

/// The first chain (the one a later chain links to) and a connection with the triggers dropped.
async fn intruder(url: &str) -> (SqliteConnection, String) {
    let mut conn = SqliteConnection::connect(url).await.unwrap();
    sqlx::query("DROP TRIGGER audit_events_no_update")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DROP TRIGGER audit_events_no_delete")
        .execute(&mut conn)
        .await
        .unwrap();
    let row =
        sqlx::query("SELECT chain_id FROM audit_events WHERE seq = 1 ORDER BY occurred_at LIMIT 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    (conn, row.get(0))
}

async fn body_at(conn: &mut SqliteConnection, chain: &str, seq: i64) -> (String, String, String) {
    let row = sqlx::query(
        "SELECT body, prev_hash, hash FROM audit_events WHERE chain_id = ? AND seq = ?",
    )
    .bind(chain)
    .bind(seq)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn an_untouched_trail_verifies_across_a_restart() {
    let (_dir, url) = trail().await;
    let store = SqliteStore::connect(&url).await.unwrap();
    let report = verify_store(&store, |_| {}).await.unwrap();
    assert_eq!(report.finding, None);
    assert_eq!(report.chains, 2);
    let chains = store.chains().await.unwrap();
    let second_open: Value =
        serde_json::from_str(&store.chain_events(&chains[1].chain_id, 0, 1).await.unwrap()[0].body)
            .unwrap();
    assert_eq!(second_open["event_type"], "CHAIN_OPENED");
    assert_eq!(
        second_open["previous_chain_id"],
        chains[0].chain_id.as_str()
    );
    assert_eq!(second_open["previous_seq"], chains[0].events);
}

#[tokio::test]
async fn one_flipped_byte_is_a_hash_mismatch_at_that_event() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    let (body, _, _) = body_at(&mut conn, &chain, 6).await;
    // Flip exactly one byte, in the middle of the stored bytes.
    let mut bytes = body.clone().into_bytes();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let flipped = String::from_utf8(bytes).unwrap();
    assert_eq!(flipped.len(), body.len());
    sqlx::query("UPDATE audit_events SET body = ? WHERE chain_id = ? AND seq = 6")
        .bind(flipped)
        .bind(&chain)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(verify(&url).await, Some((Problem::HashMismatch, chain, 6)));
}

#[tokio::test]
async fn a_deleted_event_is_a_gap_named_where_it_was() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    sqlx::query("DELETE FROM audit_events WHERE chain_id = ? AND seq = 8")
        .bind(&chain)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(verify(&url).await, Some((Problem::Gap, chain, 8)));
}

#[tokio::test]
async fn two_swapped_events_are_a_reordering() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    // Move event 5 to position 6 and event 6 to position 5, every column but seq travelling along.
    for (from, to) in [(5, -5), (6, 5), (-5, 6)] {
        sqlx::query("UPDATE audit_events SET seq = ? WHERE chain_id = ? AND seq = ?")
            .bind(to)
            .bind(&chain)
            .bind(from)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(verify(&url).await, Some((Problem::Reorder, chain, 5)));
}

#[tokio::test]
async fn a_truncated_tail_is_caught_by_the_next_chain_s_link() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    let (last,): (i64,) = sqlx::query_as("SELECT MAX(seq) FROM audit_events WHERE chain_id = ?")
        .bind(&chain)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_events WHERE chain_id = ? AND seq > ?")
        .bind(&chain)
        .bind(last - 3)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        verify(&url).await,
        Some((Problem::Truncation, chain, last - 2))
    );
}

#[tokio::test]
async fn a_forged_event_with_a_correct_own_hash_breaks_the_link_after_it() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    // Find a denial and rewrite it as an allow, recomputing its own hash from the honest prev_hash.
    let (seq,): (i64,) = sqlx::query_as(
        "SELECT seq FROM audit_events WHERE chain_id = ? AND event_type = 'DECISION' AND body LIKE '%\"effect\":\"deny\"%' ORDER BY seq LIMIT 1",
    )
    .bind(&chain)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let (body, prev_hash, _) = body_at(&mut conn, &chain, seq).await;
    let mut forged: Value = serde_json::from_str(&body).unwrap();
    forged["effect"] = json!("allow");
    forged["reason_codes"] = json!([]);
    let forged = serde_json_canonicalizer::to_string(&forged).unwrap();
    let hash = chain_hash(&prev_hash, &forged);
    sqlx::query("UPDATE audit_events SET body = ?, hash = ? WHERE chain_id = ? AND seq = ?")
        .bind(forged)
        .bind(hash)
        .bind(&chain)
        .bind(seq)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(verify(&url).await, Some((Problem::BrokenLink, chain, seq)));
}

#[tokio::test]
async fn the_cli_exits_with_the_code_of_the_damage_and_verifies_files() {
    let (dir, url) = trail().await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_catraca"))
            .args(args)
            .env("CATRACA_DATABASE_URL", &url)
            .env("CATRACA_LOG", "error")
            .output()
            .unwrap()
    };
    let ok = run(&["audit", "verify", "--quiet"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("audit verify: intact: 2 chains"));
    for file in std::fs::read_dir(dir.path().join("audit")).unwrap() {
        let path = file.unwrap().path();
        let out = run(&[
            "audit",
            "verify",
            "--quiet",
            "--file",
            path.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let (mut conn, chain) = intruder(&url).await;
    sqlx::query("DELETE FROM audit_events WHERE chain_id = ? AND seq = 4")
        .bind(&chain)
        .execute(&mut conn)
        .await
        .unwrap();
    let out = run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("FAILED (gap) at chain {chain} seq 4")),
        "{text}"
    );
}

#[tokio::test]
async fn a_tampered_json_lines_file_fails_verification() {
    let (dir, _url) = trail().await;
    let path = std::fs::read_dir(dir.path().join("audit"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(5);
    let tampered = dir.path().join("tampered.jsonl");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let report = catraca::audit::verify::verify_file(&tampered, |_| {}).unwrap();
    assert_eq!(report.finding.map(|f| f.problem), Some(Problem::Gap));
}
