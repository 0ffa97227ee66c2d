//! One store story, run on SQLite always and on PostgreSQL where `CATRACA_TEST_POSTGRES_URL` is set
//! (those tests are ignored by default; CI runs them with the service present).

use std::sync::Arc;

use catraca::audit::{EventType, GENESIS_HASH, PendingEvent, SealedEvent, seal};
use catraca::domain::{ApiKey, KeyId, RoleName, TierName};
use catraca::store::{
    CollectorRun, KeyRecord, PgStore, SnapshotRow, SqliteStore, Store, Verification,
};
use serde_json::json;
use sqlx::Connection;

fn key(role: &str) -> KeyRecord {
    let k = ApiKey::generate().unwrap();
    KeyRecord {
        key_id: k.key_id().clone(),
        name: "store-test".into(),
        role: RoleName::parse(role).unwrap(),
        contexts: None,
        tier: TierName::parse("standard").unwrap(),
        secret_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        created_at: "2026-11-22T00:00:00.000000Z".into(),
        expires_at: None,
        revoked_at: None,
        rotated_from: None,
    }
}

fn chain(chain_id: &str, n: usize) -> Vec<SealedEvent> {
    let mut prev = GENESIS_HASH.to_owned();
    (1..=n)
        .map(|i| {
            let mut e = PendingEvent::new(EventType::RequestStart, None, json!({"i": i}));
            if i == 1 {
                e.event_type = EventType::ChainOpened;
            }
            let s = seal(e, chain_id, "store-test", i as i64, &prev).unwrap();
            prev.clone_from(&s.hash);
            s
        })
        .collect()
}

async fn keys_round_trip_revoke_and_rotate(store: Arc<dyn Store>) {
    let a = key("admin");
    store.insert_key(&a).await.unwrap();
    assert_eq!(store.get_key(&a.key_id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.count_keys().await.unwrap(), 1);
    assert!(
        store
            .get_key(&KeyId::parse("0000000000000000").unwrap())
            .await
            .unwrap()
            .is_none()
    );

    let mut b = key("admin");
    b.rotated_from = Some(a.key_id.clone());
    assert!(
        store
            .rotate_key(&a.key_id, &b, "2026-11-22T01:00:00.000000Z")
            .await
            .unwrap()
    );
    assert!(
        store
            .get_key(&a.key_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );
    assert!(
        !store
            .rotate_key(&a.key_id, &key("admin"), "x")
            .await
            .unwrap(),
        "a revoked key cannot rotate"
    );
    assert_eq!(store.list_keys().await.unwrap().len(), 2);

    assert!(
        store
            .revoke_key(&b.key_id, "2026-11-22T02:00:00.000000Z")
            .await
            .unwrap()
    );
    assert!(
        !store.revoke_key(&b.key_id, "later").await.unwrap(),
        "revoking twice changes nothing"
    );
}

async fn events_append_read_back_and_stream(store: Arc<dyn Store>) {
    let events = chain("c1", 25);
    store.append_events(&events[..10]).await.unwrap();
    store.append_events(&events[10..]).await.unwrap();
    store.probe_write().await.unwrap();
    store.probe_write().await.unwrap();

    let chains = store.chains().await.unwrap();
    assert_eq!(chains.len(), 1, "the probe wrote no audit event");
    assert_eq!(chains[0].events, 25);
    assert_eq!(store.chain_events("c1", 0, 1000).await.unwrap(), events);
    assert_eq!(
        store.chain_events("c1", 20, 3).await.unwrap(),
        events[20..23].to_vec()
    );

    let tail = store
        .latest_chain_tail("store-test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (tail.chain_id.as_str(), tail.seq, tail.hash.as_str()),
        ("c1", 25, events[24].hash.as_str())
    );
    assert!(store.latest_chain_tail("other").await.unwrap().is_none());

    // Streaming by pages of 7 returns every event once, in order.
    let mut seen = Vec::new();
    let mut cursor: Option<(String, String, i64)> = None;
    loop {
        let page = store
            .events_between(
                "1970-01-01T00:00:00.000000Z",
                "9999-12-31T23:59:59.999999Z",
                cursor
                    .as_ref()
                    .map(|(a, c, s)| (a.as_str(), c.as_str(), *s)),
                7,
            )
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some((last.occurred_at.clone(), last.chain_id.clone(), last.seq));
        seen.extend(page);
    }
    assert_eq!(seen, events);

    // A duplicate position is refused: the chain cannot be overwritten.
    assert!(store.append_events(&events[..1]).await.is_err());
}

async fn recent_events_page_backwards_and_verifications_are_kept(store: Arc<dyn Store>) {
    let mut events = chain("c3", 12);
    store.append_events(&events).await.unwrap();

    // Newest first, pages of 5 following each other through the last position read.
    events.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<(String, String, i64)> = None;
    loop {
        let page = store
            .events_before(
                cursor
                    .as_ref()
                    .map(|(a, c, s)| (a.as_str(), c.as_str(), *s)),
                5,
            )
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some((last.occurred_at.clone(), last.chain_id.clone(), last.seq));
        seen.extend(page);
    }
    assert_eq!(seen, events);

    assert_eq!(store.last_verification().await.unwrap(), None);
    let mut found = Verification {
        verified_at: "2026-11-23T01:00:00.000000Z".into(),
        ok: true,
        chains: 1,
        events: 12,
        duration_ms: 3,
        finding: None,
        source: "cli".into(),
    };
    store.record_verification(&found).await.unwrap();
    found.verified_at = "2026-11-23T02:00:00.000000Z".into();
    found.ok = false;
    found.finding = Some("hash at chain c3 seq 4: altered".into());
    store.record_verification(&found).await.unwrap();
    assert_eq!(store.last_verification().await.unwrap(), Some(found));
}

async fn trace_lookup_returns_chain_order(store: Arc<dyn Store>) {
    let trace = catraca::domain::TraceId::generate();
    let mut prev = GENESIS_HASH.to_owned();
    let mut sealed = Vec::new();
    for (i, t) in [
        EventType::RequestStart,
        EventType::Decision,
        EventType::RequestEnd,
    ]
    .into_iter()
    .enumerate()
    {
        let e = PendingEvent::new(t, Some(&trace), json!({}));
        let s = seal(e, "c2", "store-test", i as i64 + 1, &prev).unwrap();
        prev.clone_from(&s.hash);
        sealed.push(s);
    }
    store.append_events(&sealed).await.unwrap();
    assert_eq!(
        store.events_for_trace(trace.as_str()).await.unwrap(),
        sealed
    );
    assert!(store.events_for_trace("nothing").await.unwrap().is_empty());
}

async fn policy_reload_requests_are_numbered_in_order(store: Arc<dyn Store>) {
    assert_eq!(store.policy_reload_requested().await.unwrap(), 0);
    let at = "2026-12-06T10:00:00.000000Z";
    let first = store
        .request_policy_reload(at, "cli:test", "aaaa")
        .await
        .unwrap();
    let second = store
        .request_policy_reload(at, "cli:test", "bbbb")
        .await
        .unwrap();
    assert!(first > 0 && second > first, "{first}, {second}");
    assert_eq!(store.policy_reload_requested().await.unwrap(), second);
}

async fn checkpoints_are_kept_in_order_and_hashes_read_without_bodies(store: Arc<dyn Store>) {
    let events = chain("c", 25);
    store.append_events(&events[..10]).await.unwrap();
    store.append_events(&events[10..]).await.unwrap();
    let hashes = store.chain_hashes("c", 3, 100).await.unwrap();
    assert_eq!(hashes.len(), 22);
    assert_eq!(hashes[0], (4, events[3].hash.clone()));
    assert_eq!(hashes[21], (25, events[24].hash.clone()));
    assert_eq!(store.chain_hashes("c", 9, 2).await.unwrap().len(), 2);
    assert!(store.chain_hashes("none", 0, 10).await.unwrap().is_empty());

    let record = |size: i64, note: &str| catraca::store::CheckpointRecord {
        chain_id: "c".into(),
        size,
        signed_at: "2026-12-06T10:00:00.000000Z".into(),
        note: note.into(),
    };
    assert_eq!(store.latest_checkpoint("c", 1).await.unwrap(), None);
    store.append_checkpoint(&record(10, "ten")).await.unwrap();
    store
        .append_checkpoint(&record(25, "twenty-five"))
        .await
        .unwrap();
    store
        .append_checkpoint(&record(25, "closed"))
        .await
        .unwrap();
    let all = store.checkpoints().await.unwrap();
    let notes: Vec<&str> = all.iter().map(|c| c.note.as_str()).collect();
    assert_eq!(notes, ["ten", "twenty-five", "closed"]);
    // The newest of the most events, when it covers the one asked for.
    assert_eq!(
        store.latest_checkpoint("c", 5).await.unwrap().unwrap().note,
        "closed"
    );
    assert_eq!(store.latest_checkpoint("c", 26).await.unwrap(), None);
    assert_eq!(store.latest_checkpoint("other", 1).await.unwrap(), None);
}

async fn collector_locks_runs_and_baselines(store: Arc<dyn Store>) {
    let t = |s: &str| format!("2026-11-22T{s}.000000Z");
    assert_eq!(
        store
            .acquire_collector_lock("pncp", "q", "r1", &t("01:00:00"), &t("01:10:00"))
            .await
            .unwrap(),
        None
    );
    let busy = store
        .acquire_collector_lock("pncp", "q", "r2", &t("01:01:00"), &t("01:11:00"))
        .await
        .unwrap();
    assert_eq!(
        busy.map(|h| h.run_id),
        Some("r1".to_owned()),
        "one run per source and query"
    );
    assert_eq!(
        store
            .acquire_collector_lock("pncp", "other", "r3", &t("01:01:00"), &t("01:11:00"))
            .await
            .unwrap(),
        None
    );
    // A holder that crashed: its lock lapses at expires_at.
    assert_eq!(
        store
            .acquire_collector_lock("pncp", "q", "r4", &t("01:20:00"), &t("01:30:00"))
            .await
            .unwrap(),
        None
    );
    store
        .release_collector_lock("pncp", "q", "r1")
        .await
        .unwrap();
    assert!(
        store
            .acquire_collector_lock("pncp", "q", "r5", &t("01:21:00"), &t("01:31:00"))
            .await
            .unwrap()
            .is_some(),
        "only the holder releases"
    );
    store
        .release_collector_lock("pncp", "q", "r4")
        .await
        .unwrap();

    let row = |id: &str, h: &str| SnapshotRow {
        record_id: id.into(),
        content_hash: h.into(),
        field_hashes: "{}".into(),
    };
    let run = |id: &str, at: &str, complete: bool| CollectorRun {
        run_id: id.into(),
        source: "pncp".into(),
        query_key: "q".into(),
        started_at: t(at),
        finished_at: t(at),
        complete,
        pages: 1,
        items: 2,
        errors: "[]".into(),
        trace_id: Some(format!("trace-of-{id}")),
    };
    assert!(
        store
            .collector_baseline("pncp", "q")
            .await
            .unwrap()
            .is_none()
    );
    store
        .save_collector_run(&run("a", "02:00:00", true), &[row("x", "1"), row("y", "1")])
        .await
        .unwrap();
    store
        .save_collector_run(&run("b", "03:00:00", false), &[row("x", "2")])
        .await
        .unwrap();
    assert_eq!(
        store.collector_run_trace("b").await.unwrap().as_deref(),
        Some("trace-of-b"),
        "a partial run keeps its request's trace id"
    );
    assert_eq!(store.collector_run_trace("nope").await.unwrap(), None);
    let (base, rows) = store
        .collector_baseline("pncp", "q")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (base.as_str(), rows.len()),
        ("a", 2),
        "an incomplete run is never the baseline"
    );
    store
        .save_collector_run(&run("c", "04:00:00", true), &[row("x", "3")])
        .await
        .unwrap();
    assert_eq!(
        store
            .collector_baseline("pncp", "q")
            .await
            .unwrap()
            .unwrap()
            .0,
        "c"
    );
    assert_eq!(
        store.record_sightings("pncp", "x").await.unwrap(),
        Some((t("02:00:00"), t("04:00:00")))
    );
    assert_eq!(
        store.record_sightings("pncp", "y").await.unwrap(),
        Some((t("02:00:00"), t("02:00:00")))
    );
}

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    (Arc::new(store), dir)
}

/// The URL of a fresh, empty database (not migrated) on the server named by
/// `CATRACA_TEST_POSTGRES_URL`.
async fn fresh_postgres_database() -> String {
    let base = std::env::var("CATRACA_TEST_POSTGRES_URL")
        .expect("CATRACA_TEST_POSTGRES_URL must name a PostgreSQL server for this test");
    let name = format!("catraca_test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    // The name is generated above from a UUID, never from input.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// The URL of a fresh, migrated database on the server named by `CATRACA_TEST_POSTGRES_URL`.
pub async fn postgres_url() -> String {
    let url = fresh_postgres_database().await;
    PgStore::connect(&url)
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap();
    url
}

async fn postgres() -> Arc<dyn Store> {
    Arc::new(PgStore::connect(&postgres_url().await).await.unwrap())
}

macro_rules! store_story {
    ($story:ident, $pg:ident) => {
        #[tokio::test]
        async fn $story() {
            let (store, _dir) = super::sqlite().await;
            super::$story(store).await;
        }

        #[tokio::test]
        #[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
        async fn $pg() {
            super::$story(super::postgres().await).await;
        }
    };
}

mod sqlite_and_postgres {
    store_story!(
        keys_round_trip_revoke_and_rotate,
        keys_round_trip_revoke_and_rotate_on_postgres
    );
    store_story!(
        events_append_read_back_and_stream,
        events_append_read_back_and_stream_on_postgres
    );
    store_story!(
        recent_events_page_backwards_and_verifications_are_kept,
        recent_events_page_backwards_and_verifications_are_kept_on_postgres
    );
    store_story!(
        trace_lookup_returns_chain_order,
        trace_lookup_returns_chain_order_on_postgres
    );
    store_story!(
        policy_reload_requests_are_numbered_in_order,
        policy_reload_requests_are_numbered_in_order_on_postgres
    );
    store_story!(
        collector_locks_runs_and_baselines,
        collector_locks_runs_and_baselines_on_postgres
    );
    store_story!(
        checkpoints_are_kept_in_order_and_hashes_read_without_bodies,
        checkpoints_are_kept_in_order_and_hashes_read_without_bodies_on_postgres
    );
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn a_policy_reload_request_is_pushed_to_listening_gateways_on_postgres() {
    // Arrange: a listener, as every gateway on PostgreSQL has; it wakes everything once on connecting.
    let store = postgres().await;
    let nudges = catraca::store::ChangeNudges::default();
    let asked = nudges.policy.clone();
    store.push_changes(nudges);
    tokio::time::timeout(std::time::Duration::from_secs(10), asked.notified())
        .await
        .expect("the listener connects and wakes the policy watcher once");

    // Act
    store
        .request_policy_reload("2026-12-06T10:00:00.000000Z", "cli:test", "aaaa")
        .await
        .unwrap();

    // Assert: woken by the push, not by the next poll (nothing polls here).
    tokio::time::timeout(std::time::Duration::from_secs(5), asked.notified())
        .await
        .expect("the request is pushed by NOTIFY");
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn instances_starting_at_once_migrate_one_fresh_postgres_database_safely() {
    // A fresh database nobody migrated yet.
    let url = fresh_postgres_database().await;

    // Four instances start at once, each applying the migrations.
    let starts = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { PgStore::connect(&url).await?.migrate().await })
    });
    for started in futures_util::future::join_all(starts).await {
        started.unwrap().unwrap();
    }

    // Each migration applied once, and the store works.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let (applied, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT version) FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(applied, distinct);
    assert!(applied >= 8, "{applied} migrations");
    let store = PgStore::connect(&url).await.unwrap();
    store.append_events(&chain("c", 2)).await.unwrap();
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn postgres_rejects_update_and_delete_on_the_audit_table() {
    let url = postgres_url().await;
    let store = PgStore::connect(&url).await.unwrap();
    store.append_events(&chain("c", 2)).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    store
        .append_checkpoint(&catraca::store::CheckpointRecord {
            chain_id: "c".into(),
            size: 2,
            signed_at: "2026-12-06T10:00:00.000000Z".into(),
            note: "n".into(),
        })
        .await
        .unwrap();
    for sql in [
        "UPDATE audit_runs SET bodies = '{}'",
        "DELETE FROM audit_runs",
        "TRUNCATE audit_runs",
        "UPDATE audit_run_traces SET trace_id = 'x'",
        "DELETE FROM audit_run_traces",
        "TRUNCATE audit_run_traces",
        "UPDATE audit_chains SET instance_id = 'x'",
        "DELETE FROM audit_chains",
        "TRUNCATE audit_chains CASCADE",
        "UPDATE audit_checkpoints SET note = 'x'",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_checkpoints",
    ] {
        let err = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    // The one-row-per-event view reads the runs; it cannot be written through.
    let err = sqlx::query("UPDATE audit_events SET body = '{}'")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot update view"), "{err}");
    let seqs: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM audit_events WHERE chain_id = 'c' ORDER BY seq")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(seqs, [1, 2]);
}

#[tokio::test]
#[ignore = "needs PostgreSQL at CATRACA_TEST_POSTGRES_URL"]
async fn a_gateway_on_postgres_serves_audits_and_verifies() {
    let url = postgres_url().await;
    let app = crate::helpers::spawn_app_with(|c| {
        c.database_url = catraca::config::DatabaseUrl::new(url.clone())
    })
    .await;
    let key = app.admin_key().await;
    assert_eq!(
        app.process(Some(&key), &crate::helpers::echo("olá"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.process(None, &crate::helpers::echo("x")).await.status(),
        401
    );
    let auditor = app.role_key("auditor").await;
    let body: serde_json::Value = app
        .process(Some(&key), &crate::helpers::echo("provado"))
        .await
        .json()
        .await
        .unwrap();
    let public = app.app.audit_public_key.clone();
    let path = format!("/v1/audit/proofs/{}", body["decision_id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let proof = loop {
        let r = app
            .client
            .get(app.url(&path))
            .header("X-API-Key", &auditor)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break r
                .json::<catraca::audit::proof::DecisionProof>()
                .await
                .unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no proof: {}",
            r.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    catraca::audit::proof::verify_offline(&proof, &public).unwrap();
    let outside = app.dir.path().join("audit").join("checkpoints.ndjson");
    let _dir = app.stop().await;
    // The stopped gateway closed its pool: the auditor connects as the CLI would.
    let store = PgStore::connect(&url).await.unwrap();
    let anchors = catraca::audit::anchored::Anchors {
        key: public,
        outside: vec![outside],
    };
    let report =
        catraca::audit::verify::verify_store_anchored(&store, Some(&anchors), 10_000, |_| {})
            .await
            .unwrap();
    assert_eq!(report.finding, None);
    assert!(report.events >= 10, "{} events", report.events);
}
