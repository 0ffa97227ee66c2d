//! The `catraca` binary as operators use it: keys (audited), policy, trace, export.

use std::path::Path;

use catraca::audit::{EventType, GENESIS_HASH, PendingEvent, SealedEvent, seal};
use catraca::domain::TraceId;
use catraca::store::{SqliteStore, Store};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

use crate::binary::{Cli, printed};
use crate::helpers::{copy_dir, echo, event_types, repo, spawn_app};

#[tokio::test]
async fn keys_are_audited_and_requests_can_be_traced_and_exported() {
    let app = spawn_app().await;
    let cli = Cli::for_app(&app);

    let before = OffsetDateTime::now_utc();
    let created: Value = serde_json::from_str(&cli.stdout(&[
        "keys",
        "create",
        "--name",
        "ana",
        "--role",
        "analyst",
        "--context",
        "work",
        "--tier",
        "bulk",
        "--expires-in",
        "90d",
        "--json",
    ]))
    .unwrap();
    let after = OffsetDateTime::now_utc();
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("ck_{key_id}_")));
    assert_eq!(created["contexts"], json!(["work"]));
    let expires = OffsetDateTime::parse(
        created["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ninety_days = time::Duration::days(90);
    assert!(
        expires >= before + ninety_days - time::Duration::seconds(1)
            && expires <= after + ninety_days + time::Duration::seconds(1),
        "--expires-in 90d gives {expires}, created between {before} and {after}"
    );

    let resp = app.process(Some(&key), &echo("x")).await;
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let result: Value = resp.json().await.unwrap();

    let timeline = cli.stdout(&["audit", "trace", &trace]);
    for needle in [
        "REQUEST_START",
        "DECISION",
        "action_matrix",
        "auth",
        "EXECUTOR_SELECTED",
        "ACTION_EXECUTED",
        "echo",
        "REQUEST_END",
        "200",
    ] {
        assert!(
            timeline.contains(needle),
            "{needle} missing from:\n{timeline}"
        );
    }
    let revision = result["policy_revision"].as_str().unwrap();
    assert!(
        timeline.contains(&revision[..12]),
        "the timeline shows the policy revision {revision}:\n{timeline}"
    );
    let as_json: Value =
        serde_json::from_str(&cli.stdout(&["audit", "trace", &trace, "--json"])).unwrap();
    assert_eq!(as_json["events"].as_array().unwrap().len(), 5);

    let listed = cli.stdout(&["keys", "list", "--json"]);
    assert!(
        listed.contains(&key_id) && !listed.contains(&key),
        "list shows ids, never keys"
    );
    cli.run(&["keys", "revoke", &key_id]);
    // Another process's revocation reaches the gateway within its bound.
    tokio::time::sleep(app.app.auth.keys().bound()).await;
    assert_eq!(app.process(Some(&key), &echo("x")).await.status(), 401);

    let export = cli.stdout(&["audit", "export", "--since", "2000-01-01"]);
    let types: Vec<String> = export
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event_type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(types.iter().any(|t| t == "KEY_CREATED"));
    assert!(types.iter().any(|t| t == "KEY_REVOKED"));
    assert!(types.iter().any(|t| t == "POLICY_LOADED"));
    let csv = parse_csv(&cli.stdout(&[
        "audit",
        "export",
        "--since",
        "2000-01-01",
        "--format",
        "csv",
    ]));
    assert_eq!(csv.len(), types.len() + 1, "one header, one row per event");
    let none = cli.stdout(&[
        "audit",
        "export",
        "--since",
        "2000-01-01",
        "--until",
        "2000-01-02",
    ]);
    assert!(none.is_empty());

    cli.run(&["policy", "test"]);
    cli.run(&["audit", "verify"]);
}

#[test]
fn policy_test_exits_1_when_a_case_fails_and_names_that_case() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_dir(&repo("policies"), &policies);
    let cli = Cli::new()
        .env("CATRACA_POLICIES_DIR", policies.display().to_string())
        .env(
            "CATRACA_EXECUTORS_DIR",
            repo("executors").display().to_string(),
        );
    cli.run(&["policy", "test"]);

    std::fs::write(
        policies.join("tests").join("zz-wrong.toml"),
        r#"
[[case]]
name = "a deliberately wrong expectation: analysts collecting"
role = "analyst"
action = "licitacoes.collect"
context = "work"
payload = { source = "pncp", endpoint = "publicacao", data_inicial = "2026-01-01", data_final = "2026-01-02", modalidade = 6 }
expect = "allow"
"#,
    )
    .unwrap();
    let out = cli.output(&["policy", "test"]);

    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        printed(&out).contains("a deliberately wrong expectation: analysts collecting"),
        "the failing case is named: {}",
        printed(&out)
    );
}

/// Seals one event per time, as one chain named `chain_id`, into `crafted.db` in `dir` (made if
/// missing); returns the database URL and the events as stored.
async fn crafted_trail(
    dir: &Path,
    chain_id: &str,
    times: &[OffsetDateTime],
) -> (String, Vec<SealedEvent>) {
    let url = format!("sqlite://{}", dir.join("crafted.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let trace = TraceId::parse("crafted-trace-0001").unwrap();
    let mut prev = GENESIS_HASH.to_owned();
    let mut sealed = Vec::new();
    for (seq, at) in (1..).zip(times) {
        let mut pending = PendingEvent::new(
            EventType::PolicyRejected,
            (seq % 2 == 0).then_some(&trace),
            json!({ "error": format!("policies/a,b.toml: \"effect\" is wrong\nat line {seq}") }),
        );
        pending.occurred_at = *at;
        let event = seal(pending, chain_id, "crafted", seq, &prev).unwrap();
        prev.clone_from(&event.hash);
        sealed.push(event);
    }
    store.append_events(&sealed).await.unwrap();
    (url, sealed)
}

#[tokio::test]
async fn the_csv_export_names_the_event_fields_and_escapes_commas_quotes_and_line_breaks() {
    let dir = tempfile::tempdir().unwrap();
    // Chain ids holding a comma, a quote and a line break, each alone, so each needs its own escaping.
    let chains = ["crafted,comma", "crafted\"quote", "crafted\nline break"];
    let at = datetime!(2026-11-10 12:00 UTC);
    let mut events = Vec::new();
    let mut url = String::new();
    for (n, chain) in (0..).zip(chains) {
        let first = at + time::Duration::minutes(n);
        let times = [first, first + time::Duration::SECOND];
        let (db, sealed) = crafted_trail(dir.path(), chain, &times).await;
        url = db;
        events.extend(sealed);
    }
    let cli = Cli::new().env("CATRACA_DATABASE_URL", url);

    let csv = cli.stdout(&[
        "audit",
        "export",
        "--since",
        "2026-11-01",
        "--until",
        "2026-12-01",
        "--format",
        "csv",
    ]);

    let rows = parse_csv(&csv);
    let (header, rows) = rows.split_first().unwrap();
    for column in [
        "event_id",
        "chain_id",
        "seq",
        "prev_hash",
        "hash",
        "event_type",
        "trace_id",
        "occurred_at",
    ] {
        assert!(
            header.iter().any(|h| h == column),
            "the header names {column}: {header:?}"
        );
    }
    assert_eq!(rows.len(), events.len(), "one row per event:\n{csv}");
    for row in rows {
        assert_eq!(
            row.len(),
            header.len(),
            "every row has every column: {row:?}"
        );
        let cell = |name: &str| -> &str {
            header
                .iter()
                .position(|h| h == name)
                .map_or("<no such column>", |i| row[i].as_str())
        };
        let event = events
            .iter()
            .find(|e| e.event_id == cell("event_id"))
            .unwrap_or_else(|| panic!("a row of no crafted event: {row:?}"));
        assert_eq!(cell("chain_id"), event.chain_id);
        assert_eq!(cell("seq"), event.seq.to_string());
        assert_eq!(cell("prev_hash"), event.prev_hash);
        assert_eq!(cell("hash"), event.hash);
        assert_eq!(cell("event_type"), event.event_type);
        assert_eq!(cell("trace_id"), event.trace_id.as_deref().unwrap_or(""));
        assert_eq!(cell("occurred_at"), event.occurred_at);
        if header.iter().any(|h| h == "body") {
            assert_eq!(
                cell("body"),
                event.body,
                "the body column holds the hashed bytes"
            );
        }
    }
}

#[tokio::test]
async fn an_export_includes_events_exactly_at_since_and_excludes_events_exactly_at_until() {
    let dir = tempfile::tempdir().unwrap();
    let times = [
        datetime!(2026-10-31 23:59:59.999999 UTC),
        datetime!(2026-11-01 00:00 UTC),
        datetime!(2026-11-15 12:00 UTC),
        datetime!(2026-11-30 23:59:59.999999 UTC),
        datetime!(2026-12-01 00:00 UTC),
    ];
    let (url, events) = crafted_trail(dir.path(), "boundaries", &times).await;
    let cli = Cli::new().env("CATRACA_DATABASE_URL", url);
    let exported = |range: [&str; 2], csv: bool| -> Vec<String> {
        let mut args = vec!["audit", "export", "--since", range[0], "--until", range[1]];
        if csv {
            args.extend(["--format", "csv"]);
        }
        let out = cli.stdout(&args);
        let mut ids: Vec<String> = if csv {
            let rows = parse_csv(&out);
            let column = rows[0].iter().position(|h| h == "event_id").unwrap();
            rows[1..].iter().map(|r| r[column].clone()).collect()
        } else {
            out.lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["event_id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        ids.sort();
        ids
    };
    let ids = |of: &[usize]| -> Vec<String> {
        let mut ids: Vec<String> = of.iter().map(|&i| events[i].event_id.clone()).collect();
        ids.sort();
        ids
    };

    // Dates are UTC midnights: --since 2026-11-01 --until 2026-12-01 is November, exactly.
    for csv in [false, true] {
        assert_eq!(
            exported(["2026-11-01", "2026-12-01"], csv),
            ids(&[1, 2, 3]),
            "csv: {csv}"
        );
    }
    // RFC 3339 times (one with an offset): the instant at --since is in, the instant at --until is out.
    assert_eq!(
        exported(
            ["2026-11-15T09:00:00-03:00", "2026-11-30T23:59:59.999999Z"],
            false
        ),
        ids(&[2])
    );
    assert_eq!(
        exported(
            ["2026-10-31T23:59:59.999999Z", "2026-11-01T00:00:00Z"],
            false
        ),
        ids(&[0])
    );
}

/// Parses RFC 4180 CSV strictly: a quoted field may hold commas, doubled quotes and line breaks; a
/// quote anywhere else is an error, so an unescaped field cannot pass.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut closed = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    field.push('"');
                    chars.next();
                }
                '"' => {
                    quoted = false;
                    closed = true;
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            ',' => {
                row.push(std::mem::take(&mut field));
                closed = false;
            }
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                closed = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            _ if closed => panic!("{c:?} after a closing quote in CSV row {}", rows.len() + 1),
            '"' if field.is_empty() => quoted = true,
            '"' => panic!("a bare quote in {field:?} in CSV row {}", rows.len() + 1),
            _ => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quoted field");
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

#[test]
fn seed_fills_an_empty_store_with_a_verifiable_trail_and_refuses_one_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/seeded.db", dir.path().display());
    let cli = Cli::on(&url, dir.path(), "seed-test");

    let out = cli.output(&["seed", "--keys", "25", "--events", "1000"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["events"], 1000);
    assert_eq!(summary["keys"], 25);
    let keys: Value = serde_json::from_str(&cli.stdout(&["keys", "list", "--json"])).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 25);
    // Stories of five events, one trace each, in a chain that verifies (CHAIN_OPENED + 1000 events).
    let trace = summary["sample_trace_id"].as_str().unwrap();
    let story: Value =
        serde_json::from_str(&cli.stdout(&["audit", "trace", trace, "--json"])).unwrap();
    assert_eq!(
        event_types(story["events"].as_array().unwrap()),
        [
            "REQUEST_START",
            "DECISION",
            "EXECUTOR_SELECTED",
            "ACTION_EXECUTED",
            "REQUEST_END"
        ]
    );
    let verify = cli.output(&["audit", "verify", "--quiet"]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert!(
        printed(&verify).contains("1001 events"),
        "{}",
        printed(&verify)
    );

    let again = cli.output(&["seed", "--keys", "1", "--events", "5"]);
    assert_eq!(again.status.code(), Some(1), "{}", printed(&again));
    assert!(
        printed(&again).contains("empty store"),
        "{}",
        printed(&again)
    );
}
