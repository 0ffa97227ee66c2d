//! Verification of the trail: intact across restarts, and each tamper case detected and named, done as
//! an intruder with file access would (append-only triggers dropped first).

use std::sync::Arc;

use catraca::audit::anchor::{PublicKey, SigningKey};
use catraca::audit::anchored::Anchors;
use catraca::audit::chain_hash;
use catraca::audit::verify::{Problem, verify_store, verify_store_anchored};
use catraca::config::DatabaseUrl;
use catraca::store::{SqliteStore, Store};
use serde_json::{Value, json};
use std::io::{Read as _, Write as _};

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use sqlx::{Connection, Row, SqliteConnection};

use crate::binary::{Cli, printed};
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
    let second = restart(&dir, &url).await;
    second.process(Some(&key), &echo("again")).await;
    second.stop().await;
    (dir, url)
}

/// The same gateway started again on `url`: its audit folder (and so its signing key) is the first
/// run's, in `dir`.
async fn restart(dir: &tempfile::TempDir, url: &str) -> crate::helpers::TestApp {
    let audit = dir.path().join("audit");
    spawn_app_with(|c| {
        c.database_url = DatabaseUrl::new(url.to_owned());
        c.audit_dir = audit;
    })
    .await
}

/// The README's exit code of `catraca audit verify` for each kind of damage.
fn readme_exit_code(problem: Problem) -> i32 {
    match problem {
        Problem::HashMismatch => 3,
        Problem::Gap => 4,
        Problem::Reorder => 5,
        Problem::Truncation => 6,
        Problem::BrokenLink => 7,
        Problem::FilesDiffer => 8,
        Problem::CheckpointMismatch => 9,
        Problem::BadCheckpoint => 10,
        Problem::MissingCheckpoint => 11,
        Problem::Unanchored => 12,
    }
}

/// Whether some line of `text` names `chain` and `seq` (as `seq <n>`): the first broken `(chain, seq)`.
fn names_chain_and_seq(text: &str, chain: &str, seq: i64) -> bool {
    let seq = seq.to_string();
    text.lines().any(|line| {
        let words: Vec<&str> = line
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        line.contains(chain) && words.windows(2).any(|w| w == ["seq", seq.as_str()])
    })
}

/// The folder of the test gateway whose database is at `url`.
fn folder_of(url: &str) -> std::path::PathBuf {
    let file = std::path::Path::new(url.strip_prefix("sqlite://").unwrap());
    file.parent().unwrap().to_path_buf()
}

/// The public key of the test gateways' checkpoints (staging makes the key beside the audit folder),
/// also written to `public.key` in the folder, and the checkpoints file kept outside the database.
fn anchors_of(url: &str) -> (Anchors, std::path::PathBuf) {
    let dir = folder_of(url);
    let key = std::fs::read_to_string(dir.join("audit-signing.key")).unwrap();
    let public: PublicKey = SigningKey::from_text(&key).unwrap().public().clone();
    let public_file = dir.join("public.key");
    std::fs::write(&public_file, public.as_str()).unwrap();
    let anchors = Anchors {
        key: public,
        outside: vec![dir.join("audit").join("checkpoints.ndjson")],
    };
    (anchors, public_file)
}

/// `catraca audit verify` on the database at `url`, held to the checkpoints with the public key.
fn verify_cli(url: &str) -> std::process::Output {
    let (anchors, public_file) = anchors_of(url);
    let checkpoints = anchors.outside[0].display().to_string();
    Cli::new().env("CATRACA_DATABASE_URL", url).output(&[
        "audit",
        "verify",
        "--public-key",
        &public_file.display().to_string(),
        "--checkpoints",
        &checkpoints,
    ])
}

/// What the verification of the chains alone (no checkpoints: what `verify` could do before them)
/// finds in the database at `url`.
async fn verify_chains_only(url: &str) -> Option<(Problem, String, i64)> {
    let store = SqliteStore::connect(url).await.unwrap();
    let report = verify_store(&store, |_| {}).await.unwrap();
    report.finding.map(|f| (f.problem, f.chain_id, f.seq))
}

/// What verification finds in the database at `url`, held to its signed checkpoints and the copy of
/// them in the audit folder, asserting that the binary agrees: exit 0 when intact, else the README's
/// code for the damage and a summary naming the same chain and seq.
async fn verify(url: &str) -> Option<(Problem, String, i64)> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(url).await.unwrap());
    let (anchors, _) = anchors_of(url);
    let report = verify_store_anchored(store.as_ref(), Some(&anchors), 10_000, |_| {})
        .await
        .unwrap();
    if let Some(f) = &report.finding {
        eprintln!("verify found: {f:?}");
    }
    let found = report.finding.map(|f| (f.problem, f.chain_id, f.seq));
    // Reading in small pages (several reads per chain, two at a time) finds the same thing.
    for page in [1, 2, 3, 7] {
        let paged = verify_store_anchored(store.as_ref(), Some(&anchors), page, |_| {})
            .await
            .unwrap();
        let paged = paged.finding.map(|f| (f.problem, f.chain_id, f.seq));
        assert_eq!(paged, found, "in pages of {page}");
    }
    let out = verify_cli(url);
    match &found {
        None => assert_eq!(out.status.code(), Some(0), "{}", printed(&out)),
        Some((problem, chain, seq)) => {
            assert_eq!(
                out.status.code(),
                Some(readme_exit_code(*problem)),
                "{problem:?}: {}",
                printed(&out)
            );
            assert!(
                names_chain_and_seq(&printed(&out), chain, *seq),
                "names chain {chain} seq {seq}: {}",
                printed(&out)
            );
        }
    }
    found
}

/// The first chain (the one a later chain links to) and a connection with the triggers dropped.
async fn intruder(url: &str) -> (SqliteConnection, String) {
    let mut conn = SqliteConnection::connect(url).await.unwrap();
    for drop in [
        "DROP TRIGGER audit_runs_no_update",
        "DROP TRIGGER audit_runs_no_delete",
    ] {
        sqlx::query(drop).execute(&mut conn).await.unwrap();
    }
    let row = sqlx::query("SELECT chain_id FROM audit_chains ORDER BY opened_at LIMIT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    (conn, row.get(0))
}

/// A chain's events as an intruder reads them from the file: its runs' bodies inflated with any zlib
/// library (runs written before migration 12 are text), one body per line beside its 32-byte hash.
async fn stored(conn: &mut SqliteConnection, chain: &str) -> Vec<Stored> {
    type Run = (i64, Vec<u8>, Vec<u8>, Option<i64>);
    let runs: Vec<Run> = sqlx::query_as(
        "SELECT r.pos, r.hashes, CAST(r.bodies AS BLOB), r.size FROM audit_runs r \
         JOIN audit_chains c ON c.chain_no = r.pos >> 40 WHERE c.chain_id = ? ORDER BY r.pos",
    )
    .bind(chain)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let mut events = Vec::new();
    for (pos, hashes, bodies, size) in runs {
        let text = match size {
            None => String::from_utf8(bodies).unwrap(),
            Some(size) => {
                let mut text = String::new();
                ZlibDecoder::new(&bodies[..])
                    .read_to_string(&mut text)
                    .unwrap();
                assert_eq!(text.len() as i64, size);
                text
            }
        };
        for (i, body) in text.lines().enumerate() {
            events.push(Stored {
                seq: (pos & ((1 << 40) - 1)) + i as i64,
                hash: hex::encode(&hashes[32 * i..32 * (i + 1)]),
                body: body.to_owned(),
            });
        }
    }
    events
}

/// The last seq stored of `chain`.
async fn last_seq(conn: &mut SqliteConnection, chain: &str) -> i64 {
    stored(conn, chain).await.last().unwrap().seq
}

/// Event `seq` of `chain`: its body, the `prev_hash` it names, and its hash.
async fn body_at(conn: &mut SqliteConnection, chain: &str, seq: i64) -> (String, String, String) {
    let e = stored(conn, chain)
        .await
        .into_iter()
        .find(|e| e.seq == seq)
        .unwrap();
    let body: Value = serde_json::from_str(&e.body).unwrap();
    let prev_hash = body["prev_hash"].as_str().unwrap().to_owned();
    (e.body, prev_hash, e.hash)
}

/// One stored event of a chain, as an intruder edits it: its position, hash (hex) and bytes.
#[derive(Clone)]
struct Stored {
    seq: i64,
    hash: String,
    body: String,
}

/// Rewrites `chain` in the database as `edit` leaves its events: the chain's runs are deleted and each
/// event written back as a run of its own (a form the trail takes, e.g. after migrating an older
/// layout), with its time and the index of its trace. What an intruder with the file could do.
async fn rewrite_chain(
    conn: &mut SqliteConnection,
    chain: &str,
    edit: impl FnOnce(&mut Vec<Stored>),
) {
    let mut events = stored(conn, chain).await;
    edit(&mut events);
    let (chain_no,): (i64,) =
        sqlx::query_as("SELECT chain_no FROM audit_chains WHERE chain_id = ?")
            .bind(chain)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    sqlx::query("DELETE FROM audit_runs WHERE pos >= ? AND pos < ?")
        .bind(chain_no << 40)
        .bind((chain_no + 1) << 40)
        .execute(&mut *conn)
        .await
        .unwrap();
    for e in events {
        let at = catraca::event::micros_of(
            serde_json::from_str::<Value>(&e.body).unwrap()["occurred_at"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        sqlx::query(
            "INSERT INTO audit_runs (pos, n, at_min, hashes, bodies) VALUES (?, 1, ?, unhex(?), ?)",
        )
        .bind((chain_no << 40) + e.seq)
        .bind(at)
        .bind(&e.hash)
        .bind(format!("{}\n", e.body))
        .execute(&mut *conn)
        .await
        .unwrap();
    }
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
    assert_eq!(verify(&url).await, None);
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
    rewrite_chain(&mut conn, &chain, |events| events[5].body = flipped).await;
    assert_eq!(verify(&url).await, Some((Problem::HashMismatch, chain, 6)));
}

/// The stored run holding `seq` of `chain`: its position and first seq.
async fn run_holding(conn: &mut SqliteConnection, chain: &str, seq: i64) -> (i64, i64) {
    let (chain_no,): (i64,) =
        sqlx::query_as("SELECT chain_no FROM audit_chains WHERE chain_id = ?")
            .bind(chain)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let (pos,): (i64,) =
        sqlx::query_as("SELECT max(pos) FROM audit_runs WHERE pos <= ? AND pos >= ?")
            .bind((chain_no << 40) + seq)
            .bind(chain_no << 40)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    (pos, pos - (chain_no << 40))
}

/// A fresh trail, opened as an intruder, and the run holding event 5 of its first chain: what the
/// run-editing cases start from.
struct RunToEdit {
    _dir: tempfile::TempDir,
    url: String,
    conn: SqliteConnection,
    chain: String,
    pos: i64,
    first: i64,
}

async fn run_to_edit() -> RunToEdit {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    let (pos, first) = run_holding(&mut conn, &chain, 5).await;
    RunToEdit {
        _dir,
        url,
        conn,
        chain,
        pos,
        first,
    }
}

impl RunToEdit {
    /// Verification names the edited run at its first event, as a hash mismatch.
    async fn assert_named_at_its_first_event(self) {
        assert_eq!(
            verify(&self.url).await,
            Some((Problem::HashMismatch, self.chain, self.first))
        );
    }
}

#[tokio::test]
async fn a_run_whose_count_or_earliest_time_was_edited_is_named_at_its_first_event() {
    // A run's header is not hashed: verification checks it against the bodies it heads.
    let mut run = run_to_edit().await;
    sqlx::query("UPDATE audit_runs SET n = n + 1 WHERE pos = ?")
        .bind(run.pos)
        .execute(&mut run.conn)
        .await
        .unwrap();
    run.assert_named_at_its_first_event().await;

    let mut run = run_to_edit().await;
    // An hour earlier: reads by time would look for its events where they are not.
    sqlx::query("UPDATE audit_runs SET at_min = at_min - 3600000000 WHERE pos = ?")
        .bind(run.pos)
        .execute(&mut run.conn)
        .await
        .unwrap();
    run.assert_named_at_its_first_event().await;
}

#[tokio::test]
async fn a_packed_run_flipped_or_lying_about_its_size_is_named_at_its_first_event() {
    // Runs keep their bodies compressed: damage inside them is reported where the run starts, not
    // skipped, guessed at, or a failed read.
    let mut run = run_to_edit().await;
    let (mut packed,): (Vec<u8>,) =
        sqlx::query_as("SELECT bodies FROM audit_runs WHERE pos = ? AND size IS NOT NULL")
            .bind(run.pos)
            .fetch_one(&mut run.conn)
            .await
            .unwrap();
    let mid = packed.len() / 2;
    packed[mid] ^= 0x40;
    sqlx::query("UPDATE audit_runs SET bodies = ? WHERE pos = ?")
        .bind(packed)
        .bind(run.pos)
        .execute(&mut run.conn)
        .await
        .unwrap();
    run.assert_named_at_its_first_event().await;

    let mut run = run_to_edit().await;
    // A claim of a gigabyte is not inflated to see.
    let edited =
        sqlx::query("UPDATE audit_runs SET size = 1 << 30 WHERE pos = ? AND size IS NOT NULL")
            .bind(run.pos)
            .execute(&mut run.conn)
            .await
            .unwrap();
    assert_eq!(edited.rows_affected(), 1);
    run.assert_named_at_its_first_event().await;

    let mut run = run_to_edit().await;
    // Honest about its size, but millions of empty bodies: read as damage, not made into events.
    let flood = vec![b'\n'; 4 << 20];
    let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
    z.write_all(&flood).unwrap();
    sqlx::query("UPDATE audit_runs SET bodies = ?, size = ? WHERE pos = ?")
        .bind(z.finish().unwrap())
        .bind(flood.len() as i64)
        .bind(run.pos)
        .execute(&mut run.conn)
        .await
        .unwrap();
    run.assert_named_at_its_first_event().await;
}

#[tokio::test]
async fn a_deleted_event_is_a_gap_named_where_it_was() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    rewrite_chain(&mut conn, &chain, |events| {
        events.remove(7);
    })
    .await;
    assert_eq!(verify(&url).await, Some((Problem::Gap, chain, 8)));
}

#[tokio::test]
async fn the_middle_of_a_chain_cut_out_is_a_gap_named_at_its_first_missing_event() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    rewrite_chain(&mut conn, &chain, |events| {
        events.retain(|e| !(4..=11).contains(&e.seq));
    })
    .await;
    assert_eq!(verify(&url).await, Some((Problem::Gap, chain, 4)));
}

#[tokio::test]
async fn two_swapped_events_are_a_reordering() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    // Move event 5 to position 6 and event 6 to position 5, everything but the position travelling
    // along.
    rewrite_chain(&mut conn, &chain, |events| {
        let (five, six) = (events[4].clone(), events[5].clone());
        events[4] = Stored { seq: 5, ..six };
        events[5] = Stored { seq: 6, ..five };
    })
    .await;
    assert_eq!(verify(&url).await, Some((Problem::Reorder, chain, 5)));
}

#[tokio::test]
async fn a_truncated_tail_is_caught_by_the_next_chain_s_link() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    let last = last_seq(&mut conn, &chain).await;
    rewrite_chain(&mut conn, &chain, |events| {
        events.retain(|e| e.seq <= last - 3)
    })
    .await;
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
    let seq = stored(&mut conn, &chain)
        .await
        .into_iter()
        .find(|e| {
            e.body.contains("\"event_type\":\"DECISION\"") && e.body.contains("\"effect\":\"deny\"")
        })
        .unwrap()
        .seq;
    let (body, prev_hash, _) = body_at(&mut conn, &chain, seq).await;
    let mut forged: Value = serde_json::from_str(&body).unwrap();
    forged["effect"] = json!("allow");
    forged["reason_codes"] = json!([]);
    let forged = serde_json_canonicalizer::to_string(&forged).unwrap();
    let hash = chain_hash(&prev_hash, &forged);
    rewrite_chain(&mut conn, &chain, |events| {
        let e = events.iter_mut().find(|e| e.seq == seq).unwrap();
        (e.body, e.hash) = (forged, hash);
    })
    .await;
    assert_eq!(verify(&url).await, Some((Problem::BrokenLink, chain, seq)));
}

#[tokio::test]
async fn the_cli_passes_each_json_lines_file_of_an_untouched_trail() {
    let (dir, _url) = trail().await;
    let mut files = 0;
    for file in std::fs::read_dir(dir.path().join("audit")).unwrap() {
        let path = file.unwrap().path();
        // The trail's files; the checkpoints file beside them is not one.
        if !path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("audit.")
        {
            continue;
        }
        let out = Cli::new().output(&[
            "audit",
            "verify",
            "--quiet",
            "--file",
            path.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
        files += 1;
    }
    assert!(files > 0);
}

#[tokio::test]
async fn the_cli_verifies_a_compressed_part_and_names_a_byte_altered_inside_it() {
    use std::io::Write as _;
    let (dir, _url) = trail().await;
    let audit = dir.path().join("audit");
    let plain = std::fs::read_dir(&audit)
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&plain).unwrap();
    let gzip = |name: &str, content: &str| {
        let path = audit.join(name);
        let mut encoder = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        encoder.write_all(content.as_bytes()).unwrap();
        encoder.finish().unwrap();
        path
    };
    let verify = |path: &std::path::Path| {
        Cli::new().output(&[
            "audit",
            "verify",
            "--quiet",
            "--file",
            path.to_str().unwrap(),
        ])
    };

    let intact = gzip("audit.2026-11-22.0001.jsonl.gz", &text);
    let out = verify(&intact);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let lines = text.lines().count();
    assert!(
        printed(&out).contains(&format!("{lines} events")),
        "{}",
        printed(&out)
    );

    // One byte of the third line altered (its year), then compressed.
    let mut altered: Vec<String> = text.lines().map(str::to_owned).collect();
    assert!(altered[2].contains("\"occurred_at\":\"2"));
    altered[2] = altered[2].replacen("\"occurred_at\":\"2", "\"occurred_at\":\"3", 1);
    let altered = gzip(
        "audit.2026-11-22.0002.jsonl.gz",
        &(altered.join("\n") + "\n"),
    );
    let out = verify(&altered);
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
}

#[tokio::test]
async fn a_chain_that_lost_its_head_is_a_truncation_at_its_first_remaining_event() {
    let (_dir, url) = trail().await;
    let (mut conn, chain) = intruder(&url).await;
    rewrite_chain(&mut conn, &chain, |events| events.retain(|e| e.seq > 2)).await;
    assert_eq!(verify(&url).await, Some((Problem::Truncation, chain, 3)));
}

#[tokio::test]
async fn a_vanished_predecessor_of_the_newest_chain_is_a_truncation_naming_it() {
    let (_dir, url) = trail().await;
    let (mut conn, first) = intruder(&url).await;
    let last = last_seq(&mut conn, &first).await;
    rewrite_chain(&mut conn, &first, Vec::clear).await;
    assert_eq!(verify(&url).await, Some((Problem::Truncation, first, last)));
}

#[tokio::test]
async fn a_chain_opened_event_naming_the_wrong_predecessor_is_a_broken_link() {
    let (_dir, url) = trail().await;
    let (mut conn, first) = intruder(&url).await;
    let (second,): (String,) =
        sqlx::query_as("SELECT chain_id FROM audit_chains WHERE chain_id <> ?")
            .bind(&first)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let last = last_seq(&mut conn, &first).await;
    // The second chain's CHAIN_OPENED is made to name another event (the one before the first chain's
    // tail), and the whole second chain is re-sealed on that claim so every link inside it holds.
    let (_, _, wrong) = body_at(&mut conn, &first, last - 1).await;
    let rows: Vec<(i64, String)> = stored(&mut conn, &second)
        .await
        .into_iter()
        .map(|e| (e.seq, e.body))
        .collect();
    let mut prev = wrong.clone();
    let mut resealed = Vec::new();
    for (seq, body) in rows {
        let mut event: Value = serde_json::from_str(&body).unwrap();
        if seq == 1 {
            assert_eq!(event["previous_chain_id"], first.as_str());
            event["previous_hash"] = json!(wrong);
        }
        event["prev_hash"] = json!(prev);
        let body = serde_json_canonicalizer::to_string(&event).unwrap();
        let hash = chain_hash(&prev, &body);
        resealed.push(Stored {
            seq,
            hash: hash.clone(),
            body,
        });
        prev = hash;
    }
    rewrite_chain(&mut conn, &second, |events| *events = resealed).await;
    assert_eq!(verify(&url).await, Some((Problem::BrokenLink, second, 1)));
}

#[test]
fn the_cli_exits_1_when_it_cannot_read_the_file_or_open_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new().cwd(dir.path());
    let missing = dir.path().join("no-such-audit.jsonl");

    let out = cli.output(&["audit", "verify", "--file", missing.to_str().unwrap()]);

    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        printed(&out).contains("no-such-audit.jsonl"),
        "{}",
        printed(&out)
    );

    // A database whose folder cannot exist: its parent is a plain file.
    let plain = dir.path().join("plain-file");
    std::fs::write(&plain, "").unwrap();
    let out = cli
        .env(
            "CATRACA_DATABASE_URL",
            format!("sqlite://{}/catraca.db", plain.display()),
        )
        .output(&["audit", "verify"]);

    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(printed(&out).contains("plain-file"), "{}", printed(&out));
}

#[tokio::test]
async fn a_tampered_json_lines_file_fails_verification() {
    let (dir, _url) = trail().await;
    let path = std::fs::read_dir(dir.path().join("audit"))
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(5);
    let tampered = dir.path().join("tampered.jsonl");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let report = catraca::audit::verify::verify_file(&tampered, |_| {}).unwrap();
    let finding = report.finding.unwrap();
    assert_eq!(finding.problem, Problem::Gap);

    let out = Cli::new().output(&["audit", "verify", "--file", tampered.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(readme_exit_code(Problem::Gap)),
        "{}",
        printed(&out)
    );
    assert!(
        names_chain_and_seq(&printed(&out), &finding.chain_id, finding.seq),
        "{}",
        printed(&out)
    );
}

#[tokio::test]
async fn a_folder_is_verified_across_its_chains_and_a_tail_lost_before_a_restart_is_a_truncation() {
    // Arrange: two runs of one gateway writing to one folder (the first chain, then the one its
    // restart opened, linked to it).
    let first = spawn_app().await;
    let key = first.admin_key().await;
    for i in 0..3 {
        first.process(Some(&key), &echo(&format!("m{i}"))).await;
    }
    let url = first.db_url();
    let dir = first.stop().await;
    let folder = dir.path().join("audit");
    let second = spawn_app_with(|c| {
        c.database_url = DatabaseUrl::new(url.clone());
        c.audit_dir = folder.clone();
    })
    .await;
    second.process(Some(&key), &echo("again")).await;
    second.stop().await;
    let intact = catraca::audit::verify::verify_file(&folder, |_| {}).unwrap();
    assert!(intact.finding.is_none(), "{:?}", intact.finding);
    assert!(intact.chains >= 2, "{} chains", intact.chains);

    // Act: a copy of the folder whose first chain lost its last line (what a crash could leave
    // before the files were brought level).
    let copy = dir.path().join("cut");
    std::fs::create_dir(&copy).unwrap();
    let files: Vec<(std::path::PathBuf, String)> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    let opened: Value = files
        .iter()
        .flat_map(|(_, text)| text.lines())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["event_type"] == "CHAIN_OPENED" && e["previous_chain_id"].is_string())
        .expect("the restart's CHAIN_OPENED names the first chain");
    let chain = opened["previous_chain_id"].as_str().unwrap().to_owned();
    let seq = opened["previous_seq"].as_i64().unwrap();
    for (path, text) in &files {
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                let e: Value = serde_json::from_str(l).unwrap();
                !(e["chain_id"] == chain.as_str() && e["seq"] == seq)
            })
            .collect();
        std::fs::write(copy.join(path.file_name().unwrap()), kept.join("\n") + "\n").unwrap();
    }
    let report = catraca::audit::verify::verify_file(&copy, |_| {}).unwrap();
    let out = Cli::new().output(&["audit", "verify", "--file", copy.to_str().unwrap()]);

    // Assert: named at the first chain, where its tail should have gone on.
    let finding = report
        .finding
        .expect("a tail lost before a restart is a finding");
    assert_eq!(finding.problem, Problem::Truncation, "{finding:?}");
    assert_eq!(
        (finding.chain_id.as_str(), finding.seq),
        (chain.as_str(), seq)
    );
    assert_eq!(
        out.status.code(),
        Some(readme_exit_code(Problem::Truncation)),
        "{}",
        printed(&out)
    );
    assert!(
        names_chain_and_seq(&printed(&out), &chain, seq),
        "{}",
        printed(&out)
    );
}

/// `catraca audit verify --against-files DIR` on the database at `url`.
fn compare_cli(url: &str, dir: &std::path::Path) -> std::process::Output {
    Cli::new().env("CATRACA_DATABASE_URL", url).output(&[
        "audit",
        "verify",
        "--against-files",
        dir.to_str().unwrap(),
    ])
}

#[tokio::test]
async fn the_database_is_compared_with_the_files_and_an_event_missing_or_different_in_them_is_named()
 {
    // Arrange: one gateway's run, its database and its folder.
    let app = spawn_app().await;
    let key = app.admin_key().await;
    for i in 0..3 {
        app.process(Some(&key), &echo(&format!("m{i}"))).await;
    }
    let url = app.db_url();
    let dir = app.stop().await;
    let folder = dir.path().join("audit");
    let (path, text) = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let fifth: Value = serde_json::from_str(lines[4]).unwrap();
    let (chain, seq) = (
        fifth["chain_id"].as_str().unwrap().to_owned(),
        fifth["seq"].as_i64().unwrap(),
    );
    // Three copies of the folder: a line removed, a line's text altered, a forged line appended.
    let copy = |name: &str, lines: Vec<String>| {
        let to = dir.path().join(name);
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join(path.file_name().unwrap()), lines.join("\n") + "\n").unwrap();
        to
    };
    let owned = |ls: &[&str]| ls.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    let mut removed = owned(&lines);
    removed.remove(4);
    let mut altered = owned(&lines);
    let mut changed = fifth.clone();
    changed["instance_id"] = json!("elsewhere");
    altered[4] = changed.to_string();
    let mut appended = owned(&lines);
    let last: Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
    let mut forged = last.clone();
    forged["seq"] = json!(last["seq"].as_i64().unwrap() + 1);
    forged["prev_hash"] = last["hash"].clone();
    appended.push(forged.to_string());

    // Act
    let intact = compare_cli(&url, &folder);
    let missing = compare_cli(&url, &copy("removed", removed));
    let different = compare_cli(&url, &copy("altered", altered));
    let extra = compare_cli(&url, &copy("appended", appended));

    // Assert: the untouched folder agrees; each change is named with exit code 8.
    assert_eq!(intact.status.code(), Some(0), "{}", printed(&intact));
    assert!(
        printed(&intact).contains("compared"),
        "{}",
        printed(&intact)
    );
    for (out, chain, seq, says) in [
        (
            &missing,
            chain.as_str(),
            seq,
            "in the database but not in the files",
        ),
        (&different, chain.as_str(), seq, "differs"),
        (
            &extra,
            forged["chain_id"].as_str().unwrap(),
            forged["seq"].as_i64().unwrap(),
            "in the files",
        ),
    ] {
        let text = printed(out);
        assert_eq!(
            out.status.code(),
            Some(readme_exit_code(Problem::FilesDiffer)),
            "{text}"
        );
        assert!(names_chain_and_seq(&text, chain, seq), "{text}");
        assert!(text.contains(says), "{text}");
    }
}

/// The newest chain (the second run's) and its last seq.
async fn newest_chain(conn: &mut SqliteConnection) -> (String, i64) {
    let (chain,): (String,) =
        sqlx::query_as("SELECT chain_id FROM audit_chains ORDER BY opened_at DESC LIMIT 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let last = last_seq(conn, &chain).await;
    (chain, last)
}

/// The chain's stored events from `from` on, rewritten in order with links and hashes recomputed as a
/// forger with the file would: each event's `prev_hash` (and `seq`) set, its hash recomputed.
fn relink(events: &mut [Stored], from: usize, mut prev: String) {
    for e in events.iter_mut().skip(from) {
        let mut body: Value = serde_json::from_str(&e.body).unwrap();
        body["prev_hash"] = json!(prev);
        body["seq"] = json!(e.seq);
        e.body = serde_json_canonicalizer::to_string(&body).unwrap();
        e.hash = chain_hash(&prev, &e.body);
        prev = e.hash.clone();
    }
}

#[tokio::test]
async fn every_chain_is_signed_and_its_last_checkpoint_closes_it() {
    let (_dir, url) = trail().await;
    let store = SqliteStore::connect(&url).await.unwrap();
    let (anchors, _) = anchors_of(&url);
    let checkpoints = store.checkpoints().await.unwrap();
    for chain in store.chains().await.unwrap() {
        let mine: Vec<_> = checkpoints
            .iter()
            .filter(|c| c.chain_id == chain.chain_id)
            .map(|c| anchors.key.open(&c.note).unwrap())
            .collect();
        let last = mine.last().expect("a chain has checkpoints");
        assert_eq!(last.size, u64::try_from(chain.events).unwrap());
        assert!(
            last.closed,
            "the last checkpoint of a stopped chain closes it"
        );
        assert!(mine[..mine.len() - 1].iter().all(|c| !c.closed));
    }
    // The file beside the trail holds the same notes as the database.
    let file = std::fs::read_to_string(&anchors.outside[0]).unwrap();
    assert_eq!(file.lines().count(), checkpoints.len());
    for c in &checkpoints {
        assert!(file.contains(&serde_json::to_string(&c.note).unwrap()));
    }
    assert_eq!(verify(&url).await, None);
}

#[tokio::test]
async fn the_newest_chain_s_cut_tail_is_caught_by_its_checkpoint() {
    let (_dir, url) = trail().await;
    let (mut conn, _) = intruder(&url).await;
    let (chain, last) = newest_chain(&mut conn).await;
    rewrite_chain(&mut conn, &chain, |events| {
        events.retain(|e| e.seq <= last - 3)
    })
    .await;
    // The chains alone cannot tell: nothing comes after the newest chain.
    assert_eq!(verify_chains_only(&url).await, None);
    assert_eq!(
        verify(&url).await,
        Some((Problem::Truncation, chain, last - 2))
    );
}

#[tokio::test]
async fn events_appended_after_the_closing_checkpoint_with_recomputed_hashes_are_named() {
    let (_dir, url) = trail().await;
    let (mut conn, _) = intruder(&url).await;
    let (chain, last) = newest_chain(&mut conn).await;
    rewrite_chain(&mut conn, &chain, |events| {
        // Two forged decisions, copies of the last events, placed after the tail and linked to it.
        let tail = events[events.len() - 2..].to_vec();
        let from = events.len();
        for (i, mut e) in tail.into_iter().enumerate() {
            e.seq = last + 1 + i64::try_from(i).unwrap();
            events.push(e);
        }
        let prev = events[from - 1].hash.clone();
        relink(events, from, prev);
    })
    .await;
    assert_eq!(verify_chains_only(&url).await, None);
    assert_eq!(
        verify(&url).await,
        Some((Problem::Unanchored, chain, last + 1))
    );
}

#[tokio::test]
async fn a_chain_rewritten_with_recomputed_hashes_does_not_match_its_checkpoint() {
    let (_dir, url) = trail().await;
    let (mut conn, _) = intruder(&url).await;
    let (chain, _) = newest_chain(&mut conn).await;
    // A denial turned into an allow, and every hash after it recomputed: the links hold.
    let seq = stored(&mut conn, &chain)
        .await
        .into_iter()
        .find(|e| e.body.contains("\"event_type\":\"DECISION\""))
        .unwrap()
        .seq;
    let (covering,): (i64,) =
        sqlx::query_as("SELECT MIN(size) FROM audit_checkpoints WHERE chain_id = ? AND size >= ?")
            .bind(&chain)
            .bind(seq)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    rewrite_chain(&mut conn, &chain, |events| {
        let i = usize::try_from(seq - 1).unwrap();
        let mut body: Value = serde_json::from_str(&events[i].body).unwrap();
        body["effect"] = json!(if body["effect"] == "allow" {
            "deny"
        } else {
            "allow"
        });
        events[i].body = serde_json_canonicalizer::to_string(&body).unwrap();
        let prev: Value = serde_json::from_str(&events[i].body).unwrap();
        relink(events, i, prev["prev_hash"].as_str().unwrap().to_owned());
    })
    .await;
    assert_eq!(verify_chains_only(&url).await, None);
    assert_eq!(
        verify(&url).await,
        Some((Problem::CheckpointMismatch, chain, covering))
    );
}

/// A connection to the database at `url` with the checkpoints' append-only triggers dropped.
async fn checkpoint_intruder(url: &str) -> SqliteConnection {
    let mut conn = SqliteConnection::connect(url).await.unwrap();
    for drop in [
        "DROP TRIGGER audit_checkpoints_no_update",
        "DROP TRIGGER audit_checkpoints_no_delete",
    ] {
        sqlx::query(drop).execute(&mut conn).await.unwrap();
    }
    conn
}

#[tokio::test]
async fn a_checkpoint_deleted_from_the_database_is_missing_against_the_copy_outside() {
    let (_dir, url) = trail().await;
    let (_, first) = intruder(&url).await;
    let mut conn = checkpoint_intruder(&url).await;
    let (size,): (i64,) =
        sqlx::query_as("SELECT MAX(size) FROM audit_checkpoints WHERE chain_id = ?")
            .bind(&first)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::query("DELETE FROM audit_checkpoints WHERE chain_id = ? AND size = ?")
        .bind(&first)
        .bind(size)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        verify(&url).await,
        Some((Problem::MissingCheckpoint, first, size))
    );
}

/// Replaces the note of `chain`'s stored checkpoints of `size` events.
async fn set_note(conn: &mut SqliteConnection, chain: &str, size: i64, note: &str) {
    sqlx::query("UPDATE audit_checkpoints SET note = ? WHERE chain_id = ? AND size = ?")
        .bind(note)
        .bind(chain)
        .bind(size)
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_checkpoint_signed_by_another_key_or_altered_is_a_bad_checkpoint() {
    let (_dir, url) = trail().await;
    let (_, first) = intruder(&url).await;
    let mut conn = checkpoint_intruder(&url).await;
    let (size, note): (i64, String) = sqlx::query_as(
        "SELECT size, note FROM audit_checkpoints WHERE chain_id = ? ORDER BY size DESC LIMIT 1",
    )
    .bind(&first)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    // The same chain head, signed by another key.
    let (anchors, _) = anchors_of(&url);
    let genuine = anchors.key.open(&note).unwrap();
    let other = SigningKey::from_text(&SigningKey::generate("catraca").unwrap()).unwrap();
    let forged = other
        .sign(&first, genuine.size, genuine.root, genuine.closed)
        .unwrap();
    set_note(&mut conn, &first, size, &forged).await;
    assert_eq!(
        verify(&url).await,
        Some((Problem::BadCheckpoint, first.clone(), size))
    );

    // The genuine note, its size edited to cover more than the chain holds.
    let altered = note.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size + 5), 1);
    set_note(&mut conn, &first, size, &altered).await;
    assert_eq!(
        verify(&url).await,
        Some((Problem::BadCheckpoint, first, size))
    );
}

#[tokio::test]
async fn a_database_replaced_by_an_older_copy_of_itself_is_caught_by_the_checkpoints_outside() {
    let first = spawn_app().await;
    let key = first.admin_key().await;
    for i in 0..3 {
        first.process(Some(&key), &echo(&format!("m{i}"))).await;
    }
    let url = first.db_url();
    let dir = first.stop().await;
    let db = dir.path().join("catraca.db");
    let older = dir.path().join("older.db");
    // A consistent copy of the whole database, as a backup would take it.
    let mut conn = SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("VACUUM INTO ?")
        .bind(older.display().to_string())
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let second = restart(&dir, &url).await;
    second.process(Some(&key), &echo("later")).await;
    let newer_chain = second.app.audit.chain_id().to_owned();
    second.stop().await;
    // The intruder restores the older copy: every chain in it is whole and signed.
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("catraca.db{suffix}")));
    }
    std::fs::copy(&older, &db).unwrap();
    assert_eq!(verify_chains_only(&url).await, None);
    assert_eq!(
        verify(&url).await,
        Some((Problem::Truncation, newer_chain, 1))
    );
}
