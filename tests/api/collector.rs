//! The PNCP collector through /process, against a loopback server that answers like the PNCP
//! consultation API; never the live API. The default tests serve the project's own PNCP-shaped
//! fixtures (`tests/fixtures/pncp/`); the tests in [`recorded`] replay real recorded responses from
//! `../shared/fixtures/pncp/` and run only where that folder exists (see `build.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use crate::binary::Cli;
use crate::helpers::{TestApp, spawn_app_with};

/// One request as the fixture server saw it.
pub struct Hit {
    /// `publicacao` or `atualizacao`.
    pub endpoint: String,
    /// The `pagina` parameter (0 when absent).
    pub page: u32,
    /// How many requests came before this one.
    pub n: usize,
}

/// Holds the replies it is attached to until [`Hold::release`], and tells the test when a request
/// has arrived: a test waits for a condition instead of guessing a head start.
pub struct Hold {
    arrived: Semaphore,
    open: watch::Sender<bool>,
}

impl Hold {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            arrived: Semaphore::new(0),
            open: watch::channel(false).0,
        })
    }

    /// Waits until a held request has reached the fixture server.
    pub async fn arrival(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.arrived.acquire())
            .await
            .expect("a held request reaches the fixture within 30 s")
            .unwrap()
            .forget();
    }

    /// Lets every held reply (and every later one) go.
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        self.arrived.add_permits(1);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
}

/// One scripted answer of the fixture server.
#[derive(Clone)]
pub struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    hold: Option<Arc<Hold>>,
}

impl Reply {
    pub fn json(body: impl Into<Vec<u8>>) -> Self {
        Self::status(200, "application/json", body)
    }

    pub fn status(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            hold: None,
        }
    }

    /// This reply waits for `hold` to be released.
    pub fn held(self, hold: &Arc<Hold>) -> Self {
        Self {
            hold: Some(hold.clone()),
            ..self
        }
    }
}

type Script = dyn Fn(Hit) -> Reply + Send + Sync;

/// A loopback server answering `GET /api/consulta/v1/contratacoes/{endpoint}` from a script.
pub struct Fixture {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Every request's endpoint, query and arrival time, in arrival order.
    pub requests: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone)]
pub struct Seen {
    pub endpoint: String,
    pub query: HashMap<String, String>,
    pub at: Instant,
}

impl Fixture {
    pub fn seen(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct FixtureState {
    script: Arc<Script>,
    hits: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Seen>>>,
}

async fn answer(
    State(s): State<FixtureState>,
    Path(endpoint): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let at = Instant::now();
    let n = s.hits.fetch_add(1, Ordering::SeqCst);
    let page: u32 = query
        .get("pagina")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    s.requests.lock().unwrap().push(Seen {
        endpoint: endpoint.clone(),
        query,
        at,
    });
    let reply = (s.script)(Hit { endpoint, page, n });
    if let Some(hold) = &reply.hold {
        hold.pass().await;
    }
    (
        StatusCode::from_u16(reply.status).unwrap(),
        [(header::CONTENT_TYPE, reply.content_type)],
        reply.body,
    )
        .into_response()
}

pub async fn fixture(script: impl Fn(Hit) -> Reply + Send + Sync + 'static) -> Fixture {
    let state = FixtureState {
        script: Arc::new(script),
        hits: Arc::new(AtomicUsize::new(0)),
        requests: Arc::new(Mutex::new(Vec::new())),
    };
    let (hits, requests) = (state.hits.clone(), state.requests.clone());
    let router = axum::Router::new()
        .route(
            "/api/consulta/v1/contratacoes/{endpoint}",
            axum::routing::get(answer),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Fixture {
        addr,
        hits,
        requests,
    }
}

/// A file of the project's own PNCP-shaped fixtures.
pub fn own(name: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pncp/");
    std::fs::read(format!("{path}{name}")).unwrap()
}

/// A recorded real PNCP response, kept outside the repository.
pub fn recorded(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../shared/fixtures/pncp/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("needs the recorded PNCP responses in ../shared/fixtures/pncp ({path}: {e})")
    })
}

fn page_data(body: &[u8]) -> Vec<Value> {
    let page: Value = serde_json::from_slice(body).unwrap();
    page["data"].as_array().unwrap().clone()
}

/// The ten invented records of the project's own `publicacao` page (modality 8, SP).
pub fn records() -> Vec<Value> {
    page_data(&own("contratacoes_publicacao.json"))
}

/// The ten real records of the recorded `publicacao` page (modality 8, SP).
pub fn recorded_records() -> Vec<Value> {
    page_data(&recorded(
        "02a_contratacoes_publicacao_mod8_SP_page1of71_raw.json",
    ))
}

/// A PNCP pagination envelope around `data`, page `page` of `pages`.
pub fn envelope(data: &[Value], page: u32, pages: u32) -> Vec<u8> {
    json!({
        "data": data,
        "totalRegistros": data.len() as u32 * pages,
        "totalPaginas": pages,
        "numeroPagina": page,
        "paginasRestantes": pages - page,
        "empty": data.is_empty(),
    })
    .to_string()
    .into_bytes()
}

/// A gateway whose `pncp` executor points at `fx`, politely fast for tests; `extra` settings
/// (`key = value` lines) replace the defaults of the same name.
async fn gateway(fx: &Fixture, extra: &str) -> TestApp {
    gateway_with_timeout(fx, 20_000, extra).await
}

async fn gateway_with_timeout(fx: &Fixture, timeout_ms: u64, extra: &str) -> TestApp {
    let url = format!("http://{}/api/consulta", fx.addr);
    let defaults = [
        ("source", "\"pncp\"".to_owned()),
        ("base_url", format!("\"{url}\"")),
        ("min_interval_ms", "0".into()),
        ("request_timeout_ms", "500".into()),
        ("max_retries", "2".into()),
        ("retry_backoff_ms", "10".into()),
        ("cache_ttl_secs", "0".into()),
        ("page_size", "5".into()),
    ];
    let mut settings: Vec<String> = defaults
        .iter()
        .filter(|(k, _)| !extra.lines().any(|l| l.starts_with(&format!("{k} ="))))
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    settings.extend(extra.lines().map(str::to_owned));
    let file = format!(
        "name = \"pncp\"\nkind = \"collector\"\ntimeout_ms = {timeout_ms}\n[settings]\n{}\n",
        settings.join("\n")
    );
    spawn_app_with(move |c| std::fs::write(c.executors_dir.join("pncp.toml"), file).unwrap()).await
}

fn collect_from(endpoint: &str, uf: &str) -> Value {
    json!({"action": "licitacoes.collect", "context_id": "work", "payload": {
        "source": "pncp", "endpoint": endpoint, "data_inicial": "2026-09-17",
        "data_final": "2026-09-17", "modalidade": 8, "uf": uf}})
}

async fn run_endpoint(app: &TestApp, key: &str, endpoint: &str, uf: &str) -> (u16, Value) {
    let resp = app.process(Some(key), &collect_from(endpoint, uf)).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn run(app: &TestApp, key: &str, uf: &str) -> (u16, Value) {
    run_endpoint(app, key, "publicacao", uf).await
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

fn ids_of(records: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = records
        .iter()
        .map(|r| r["numeroControlePNCP"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

async fn refusals(app: &TestApp, reason: &str) -> Option<f64> {
    let text = app.get_text("/metrics").await;
    crate::prom::sample(
        &text,
        "catraca_collector_refusals_total",
        &[("executor", "pncp"), ("reason", reason)],
    )
}

async fn runs(app: &TestApp, outcome: &str) -> Option<f64> {
    let text = app.get_text("/metrics").await;
    crate::prom::sample(
        &text,
        "catraca_collector_runs_total",
        &[("executor", "pncp"), ("outcome", outcome)],
    )
}

/// Two pages of five, the second repeating a record of the first: every page followed, the
/// duplicate dropped, every record new on a first run.
async fn pages_are_followed_and_deduplicated(recs: Vec<Value>) {
    let (a, b) = (recs[..5].to_vec(), recs[5..10].to_vec());
    let fx = fixture(move |hit| match hit.page {
        1 => Reply::json(envelope(&a, 1, 2)),
        // The second page repeats a record of the first, as the live API does when data moves.
        _ => Reply::json(envelope(&[b.clone(), vec![a[0].clone()]].concat(), 2, 2)),
    })
    .await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;

    let (status, body) = run(&app, &key, "SP").await;

    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["complete"], true);
    assert_eq!(r["pages"], 2);
    assert_eq!(r["items"], 10);
    assert_eq!(r["duplicates"], 1);
    assert_eq!(ids(&r["new"]), ids_of(&recs[..10]));
    assert!(
        r["changed"].as_array().unwrap().is_empty() && r["not_seen"].as_array().unwrap().is_empty()
    );
    assert_eq!(
        ids_of(r["records"].as_array().unwrap()),
        ids_of(&recs[..10])
    );
    assert_eq!(r["records_truncated"], false);
    let seen = fx.seen();
    let pages: Vec<&str> = seen.iter().map(|s| s.query["pagina"].as_str()).collect();
    assert_eq!(pages, ["1", "2"]);
    let q = &seen[0].query;
    assert_eq!(q["dataInicial"], "20260917");
    assert_eq!(q["dataFinal"], "20260917");
    assert_eq!(q["codigoModalidadeContratacao"], "8");
    assert_eq!(q["uf"], "SP");
    assert_eq!(q["tamanhoPagina"], "5");
}

#[tokio::test]
async fn every_page_is_followed_duplicates_are_dropped_and_the_first_run_is_all_new() {
    pages_are_followed_and_deduplicated(records()).await;
}

#[tokio::test]
async fn a_204_is_an_empty_complete_run() {
    let fx = fixture(|_| Reply::status(204, "application/json", "")).await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (status, body) = run(&app, &key, "SP").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["complete"], true);
    assert_eq!(body["result"]["items"], 0);
    assert_eq!(fx.hits.load(Ordering::SeqCst), 1);
}

/// A 400 with the source's error body: not retried, its `message` reported.
async fn a_400_is_reported_once(body_400: Vec<u8>) {
    let fx = fixture(move |_| Reply::status(400, "application/json", body_400.clone())).await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (_, body) = run(&app, &key, "SP").await;
    let r = &body["result"];
    assert_eq!(r["complete"], false);
    assert_eq!(r["errors"][0]["page"], 1);
    let error = r["errors"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("HTTP 400") && error.contains("codigoModalidadeContratacao"),
        "{error}"
    );
    assert_eq!(fx.hits.load(Ordering::SeqCst), 1, "a 400 is not retried");
}

#[tokio::test]
async fn a_400_is_not_retried_and_its_message_is_reported() {
    a_400_is_reported_once(own("erro_400.json")).await;
}

#[tokio::test]
async fn a_429_with_an_html_body_is_retried_then_succeeds() {
    let recs = records();
    let fx = fixture(move |hit| {
        if hit.n == 0 {
            Reply::status(429, "text/html", own("limite_429.html"))
        } else {
            Reply::json(envelope(&recs[..3], 1, 1))
        }
    })
    .await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (status, body) = run(&app, &key, "SP").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["complete"], true);
    assert_eq!(body["result"]["items"], 3);
    assert_eq!(fx.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_plain_text_500_is_retried_and_a_persistent_one_leaves_the_run_incomplete() {
    let fx = fixture(|_| Reply::status(500, "application/json", own("erro_500.txt"))).await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (status, body) = run(&app, &key, "SP").await;
    assert_eq!(
        status, 200,
        "a partial run still answers with what it got: {body}"
    );
    let r = &body["result"];
    assert_eq!(r["complete"], false);
    let error = r["errors"][0]["error"].as_str().unwrap();
    assert!(error.contains("HTTP 500"), "{error}");
    // max_retries = 2 in `gateway`: the first attempt and two retries.
    assert_eq!(fx.hits.load(Ordering::SeqCst), 3);
}

/// A page above `max_response_bytes` = 100 000 is refused, naming the limit.
async fn an_oversized_page_is_refused(page: Vec<u8>) {
    assert!(page.len() > 100_000, "the page must exceed the limit");
    let fx = fixture(move |_| Reply::json(page.clone())).await;
    let app = gateway(&fx, "max_response_bytes = 100000\n").await;
    let key = app.admin_key().await;
    let (_, body) = run(&app, &key, "SP").await;
    let error = body["result"]["errors"][0]["error"].as_str().unwrap();
    assert!(error.contains("100000 bytes"), "{error}");
    assert_eq!(body["result"]["complete"], false);
    assert_eq!(body["result"]["items"], 0);
}

#[tokio::test]
async fn an_oversized_response_is_refused_clearly() {
    // Sixty copies of the ten records: ~120 KB, the size of a page of 500 small tenders.
    let recs = records();
    let many: Vec<Value> = (0..60).flat_map(|_| recs.clone()).collect();
    an_oversized_page_is_refused(envelope(&many, 1, 1)).await;
}

#[tokio::test]
async fn a_page_that_never_answers_times_out_and_is_retried() {
    let hold = Hold::new();
    let held = hold.clone();
    let fx = fixture(move |_| Reply::json(envelope(&[], 1, 1)).held(&held)).await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (_, body) = run(&app, &key, "SP").await;
    let error = body["result"]["errors"][0]["error"].as_str().unwrap();
    // request_timeout_ms = 500 in `gateway`.
    assert!(error.contains("500 ms"), "{error}");
    assert_eq!(body["result"]["complete"], false);
    assert_eq!(fx.hits.load(Ordering::SeqCst), 3);
    hold.release();
}

/// Four runs of one query: new, changed and not seen against the last complete run; a partial run
/// reports nothing as gone and is never a baseline.
async fn runs_are_diffed_against_the_last_complete_run(recs: Vec<Value>) {
    let round = Arc::new(AtomicUsize::new(0));
    let r2 = round.clone();
    let served = recs.clone();
    let fx = fixture(move |_| {
        let mut data = served[..6].to_vec();
        match r2.load(Ordering::SeqCst) {
            0 => {}
            // Round 2: record 0 changes its value and object, record 5 disappears, record 6 appears.
            1 => {
                data[0]["valorTotalEstimado"] = json!(999.99);
                data[0]["objetoCompra"] = json!("objeto alterado");
                data[5] = served[6].clone();
            }
            // Round 3: the source fails: a partial run.
            _ => return Reply::status(503, "text/plain", "Service Unavailable"),
        }
        Reply::json(envelope(&data, 1, 1))
    })
    .await;
    let app = gateway(&fx, "max_retries = 0\n").await;
    let key = app.admin_key().await;
    let id = |i: usize| recs[i]["numeroControlePNCP"].as_str().unwrap().to_owned();

    let (_, first) = run(&app, &key, "SP").await;
    assert_eq!(ids(&first["result"]["new"]), ids_of(&recs[..6]));
    round.store(1, Ordering::SeqCst);
    let (_, second) = run(&app, &key, "SP").await;
    let r = &second["result"];
    assert_eq!(r["baseline_run_id"], first["result"]["run_id"]);
    assert_eq!(ids(&r["new"]), vec![id(6)]);
    assert_eq!(ids(&r["not_seen"]), vec![id(5)]);
    let changed = r["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{r}");
    assert_eq!(changed[0]["id"], id(0));
    assert_eq!(
        ids(&changed[0]["fields"]),
        ["objetoCompra", "valorTotalEstimado"]
    );

    round.store(2, Ordering::SeqCst);
    let (_, third) = run(&app, &key, "SP").await;
    assert_eq!(third["result"]["complete"], false);
    assert!(
        third["result"]["not_seen"].as_array().unwrap().is_empty(),
        "an outage is not a vanished market"
    );

    round.store(1, Ordering::SeqCst);
    let (_, fourth) = run(&app, &key, "SP").await;
    assert_eq!(
        fourth["result"]["baseline_run_id"], second["result"]["run_id"],
        "the partial run is never a baseline"
    );
    assert!(fourth["result"]["new"].as_array().unwrap().is_empty());

    // The runbook: each run counted by outcome, and the partial run's request found by its run id.
    assert_eq!(runs(&app, "complete").await, Some(3.0));
    assert_eq!(runs(&app, "partial").await, Some(1.0));
    assert_eq!(runs(&app, "failed").await, Some(0.0));
    let run_id = third["result"]["run_id"].as_str().unwrap();
    let traced: Value = serde_json::from_str(
        &Cli::for_app(&app).stdout(&["audit", "trace", "--run-id", run_id, "--json"]),
    )
    .unwrap();
    assert_eq!(traced["trace_id"], third["trace_id"], "{traced}");
    let types: Vec<&str> = traced["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"ACTION_EXECUTED"), "{types:?}");

    let (first_seen, last_seen) = app
        .app
        .store
        .record_sightings("pncp", &id(0))
        .await
        .unwrap()
        .unwrap();
    assert!(first_seen < last_seen);
}

#[tokio::test]
async fn a_second_run_reports_new_changed_and_not_seen_against_the_last_complete_run() {
    runs_are_diffed_against_the_last_complete_run(records()).await;
}

#[tokio::test]
async fn a_concurrent_run_of_the_same_query_is_refused_clearly_and_counted_as_busy() {
    let recs = records();
    let hold = Hold::new();
    let held = hold.clone();
    // The first request is held inside the source until the test releases it; any later one answers.
    let fx = fixture(move |hit| {
        let reply = Reply::json(envelope(&recs[..2], 1, 1));
        if hit.n == 0 { reply.held(&held) } else { reply }
    })
    .await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;

    let ((first_status, first_body), ((status, refused), other_query)) =
        tokio::join!(run(&app, &key, "SP"), async {
            // The first run holds the lock from before its first request until its end.
            hold.arrival().await;
            let refused = run(&app, &key, "SP").await;
            let other_query = run(&app, &key, "RJ").await;
            hold.release();
            (refused, other_query)
        });

    assert_eq!(first_status, 200, "{first_body}");
    assert_eq!(status, 502, "{refused}");
    assert_eq!(refused["reason_codes"], json!(["EXECUTOR_FAILED"]));
    let run_id = first_body["result"]["run_id"].as_str().unwrap();
    assert!(
        refused["message"].as_str().unwrap().contains(run_id),
        "the refusal names the run in progress: {refused}"
    );
    assert_eq!(refusals(&app, "busy").await, Some(1.0));
    assert_eq!(
        other_query.0, 200,
        "another query is not blocked: {}",
        other_query.1
    );
}

#[tokio::test]
async fn the_lock_of_a_run_that_died_lapses_after_its_lease_and_the_next_run_takes_over() {
    let recs = records();
    let hold = Hold::new();
    let held = hold.clone();
    // The first run never hears back: the executor's timeout aborts it, so it never releases its lock.
    let fx = fixture(move |hit| {
        let reply = Reply::json(envelope(&recs[..2], 1, 1));
        if hit.n == 0 { reply.held(&held) } else { reply }
    })
    .await;
    let app = gateway_with_timeout(
        &fx,
        1_000,
        "request_timeout_ms = 5000\nlock_margin_ms = 3000\n",
    )
    .await;
    let key = app.admin_key().await;
    // The lease: timeout_ms 1000 + lock_margin_ms 3000, counted from the run's start.
    let lease = Duration::from_millis(4_000);
    let sent = Instant::now();

    let (died, _) = run(&app, &key, "SP").await;
    let (blocked, refused) = run(&app, &key, "SP").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken_over = loop {
        let (status, body) = run(&app, &key, "SP").await;
        if status == 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let waited = sent.elapsed();
    hold.release();

    assert_eq!(died, 504, "the first run is aborted by its timeout");
    assert_eq!(blocked, 502, "its lock outlives it: {refused}");
    assert_eq!(refused["reason_codes"], json!(["EXECUTOR_FAILED"]));
    assert_eq!(taken_over.0, 200, "{}", taken_over.1);
    assert_eq!(taken_over.1["result"]["complete"], true);
    assert!(
        waited >= lease,
        "taken over after {waited:?}, before the lease of {lease:?} ended"
    );
}

#[tokio::test]
async fn a_switched_off_source_is_refused_and_counted() {
    let fx = fixture(|_| Reply::json(envelope(&[], 1, 1))).await;
    let app = gateway(&fx, "enabled = false\n").await;
    let key = app.admin_key().await;
    let (status, body) = run(&app, &key, "SP").await;
    assert_eq!(status, 502);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("enabled = false"),
        "the refusal names the setting: {body}"
    );
    assert_eq!(fx.hits.load(Ordering::SeqCst), 0);
    assert_eq!(refusals(&app, "disabled").await, Some(1.0));
}

#[tokio::test]
async fn pages_are_cached_for_their_ttl() {
    let recs = records();
    let fx = fixture(move |_| Reply::json(envelope(&recs[..2], 1, 1))).await;
    let app = gateway(&fx, "cache_ttl_secs = 60\n").await;
    let key = app.admin_key().await;
    run(&app, &key, "SP").await;
    let (_, again) = run(&app, &key, "SP").await;
    assert_eq!(again["result"]["complete"], true);
    assert_eq!(
        fx.hits.load(Ordering::SeqCst),
        1,
        "the second run read the cached page"
    );
}

#[tokio::test]
async fn a_run_stops_at_max_pages_and_is_incomplete() {
    let recs = records();
    // The source announces five pages of two records.
    let fx = fixture(move |hit| {
        let at = (hit.page as usize - 1) * 2;
        Reply::json(envelope(&recs[at..at + 2], hit.page, 5))
    })
    .await;
    let app = gateway(&fx, "max_pages = 2\n").await;
    let key = app.admin_key().await;

    let (status, body) = run(&app, &key, "SP").await;

    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["complete"], false);
    assert_eq!(r["pages"], 2);
    assert_eq!(r["items"], 4);
    assert_eq!(
        fx.hits.load(Ordering::SeqCst),
        2,
        "page 3 is never asked for"
    );
    let errors = r["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{r}");
    assert_eq!(errors[0]["page"], 3);
    assert!(
        errors[0]["error"].as_str().unwrap().contains("max_pages"),
        "the error names the setting: {r}"
    );
    assert!(r["not_seen"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn records_beyond_result_records_are_listed_by_id_and_marked_truncated() {
    let recs = records();
    let served = recs.clone();
    let fx = fixture(move |_| Reply::json(envelope(&served, 1, 1))).await;
    let app = gateway(&fx, "page_size = 10\nresult_records = 4\n").await;
    let key = app.admin_key().await;

    let (status, body) = run(&app, &key, "SP").await;

    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["records_truncated"], true);
    assert_eq!(ids(&r["new"]), ids_of(&recs), "every id is listed");
    let full = r["records"].as_array().unwrap();
    assert_eq!(full.len(), 4, "at most result_records in full");
    for record in full {
        assert!(recs.contains(record), "a whole record: {record}");
    }
}

#[tokio::test]
async fn requests_to_the_source_are_spaced_by_min_interval_ms() {
    let recs = records();
    let fx = fixture(move |hit| {
        let at = hit.page as usize - 1;
        Reply::json(envelope(&recs[at..=at], hit.page, 4))
    })
    .await;
    let app = gateway(&fx, "min_interval_ms = 600\n").await;
    let key = app.admin_key().await;

    let (status, body) = run(&app, &key, "SP").await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["pages"], 4);
    let seen = fx.seen();
    assert_eq!(seen.len(), 4);
    // The collector spaces the moments it sends; the fixture sees arrivals, each later than its send
    // by a delay a loaded machine may stretch. Half the interval leaves 300 ms for that delay.
    for pair in seen.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(300),
            "two requests {gap:?} apart with min_interval_ms = 600"
        );
    }
}

#[tokio::test]
async fn the_atualizacao_endpoint_is_requested_at_its_own_path_as_a_query_of_its_own() {
    let fx = fixture(|hit| match hit.endpoint.as_str() {
        "atualizacao" => Reply::json(own("contratacoes_atualizacao.json")),
        _ => Reply::json(own("contratacoes_publicacao.json")),
    })
    .await;
    let app = gateway(&fx, "page_size = 10\n").await;
    let key = app.admin_key().await;
    let (_, publicacao) = run_endpoint(&app, &key, "publicacao", "SP").await;
    assert_eq!(publicacao["result"]["complete"], true, "{publicacao}");

    let (status, body) = run_endpoint(&app, &key, "atualizacao", "SP").await;

    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["complete"], true);
    let updated = page_data(&own("contratacoes_atualizacao.json"));
    assert_eq!(ids(&r["new"]), ids_of(&updated));
    assert!(
        r["query"].as_str().unwrap().starts_with("atualizacao?"),
        "{r}"
    );
    assert_eq!(
        r["baseline_run_id"],
        Value::Null,
        "a publicacao run is not a baseline for atualizacao"
    );
    let seen = fx.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.endpoint, "atualizacao");
    assert_eq!(last.query["dataInicial"], "20260917");
    assert_eq!(last.query["dataFinal"], "20260917");
    assert_eq!(last.query["codigoModalidadeContratacao"], "8");
    assert_eq!(last.query["uf"], "SP");
    assert_eq!(
        seen.iter().filter(|s| s.endpoint == "atualizacao").count(),
        1
    );
}

/// The same stories against real PNCP responses recorded by third parties (`../shared/fixtures/pncp`).
mod recorded {
    use super::*;

    #[tokio::test]
    #[cfg_attr(
        not(recorded_pncp),
        ignore = "needs the recorded PNCP responses in ../shared/fixtures/pncp"
    )]
    async fn real_records_are_followed_across_pages_and_deduplicated() {
        pages_are_followed_and_deduplicated(recorded_records()).await;
    }

    #[tokio::test]
    #[cfg_attr(
        not(recorded_pncp),
        ignore = "needs the recorded PNCP responses in ../shared/fixtures/pncp"
    )]
    async fn real_records_are_diffed_against_the_last_complete_run() {
        runs_are_diffed_against_the_last_complete_run(recorded_records()).await;
    }

    #[tokio::test]
    #[cfg_attr(
        not(recorded_pncp),
        ignore = "needs the recorded PNCP responses in ../shared/fixtures/pncp"
    )]
    async fn the_real_400_body_is_not_retried_and_its_message_is_reported() {
        a_400_is_reported_once(recorded("05_error_400_missing_modalidade.json")).await;
    }

    #[tokio::test]
    #[cfg_attr(
        not(recorded_pncp),
        ignore = "needs the recorded PNCP responses in ../shared/fixtures/pncp"
    )]
    async fn a_real_page_of_500_contracts_is_refused_above_max_response_bytes() {
        an_oversized_page_is_refused(recorded("01_contratos_page1of2_500rec_raw.json")).await;
    }

    #[tokio::test]
    #[cfg_attr(
        not(recorded_pncp),
        ignore = "needs the recorded PNCP responses in ../shared/fixtures/pncp"
    )]
    async fn a_real_envelope_of_71_pages_is_followed_up_to_max_pages() {
        // The recorded page, served as every page: its envelope says 71 pages.
        let page = recorded("02a_contratacoes_publicacao_mod8_SP_page1of71_raw.json");
        let fx = fixture(move |_| Reply::json(page.clone())).await;
        let app = gateway(&fx, "page_size = 10\nmax_pages = 3\n").await;
        let key = app.admin_key().await;

        let (status, body) = run(&app, &key, "SP").await;

        assert_eq!(status, 200, "{body}");
        let r = &body["result"];
        assert_eq!(r["complete"], false);
        assert_eq!(r["pages"], 3);
        assert_eq!(r["items"], 10);
        assert_eq!(r["duplicates"], 20);
        assert_eq!(r["errors"][0]["page"], 4);
        assert_eq!(fx.hits.load(Ordering::SeqCst), 3);
    }
}
