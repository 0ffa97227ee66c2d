//! The PNCP collector through /process, against a local server that serves recorded PNCP responses
//! (`../shared/fixtures/pncp/`); never the live API.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_with};

/// One scripted answer of the fixture server.
#[derive(Clone)]
pub struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    delay: Duration,
}

impl Reply {
    pub fn json(body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            content_type: "application/json",
            body: body.into(),
            delay: Duration::ZERO,
        }
    }
    fn status(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }
}

type Script = dyn Fn(u32, usize) -> Reply + Send + Sync;

/// A loopback server answering `GET /v1/contratacoes/{endpoint}` from a script of (page, hit number).
pub struct Fixture {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub queries: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

#[derive(Clone)]
struct FixtureState {
    script: Arc<Script>,
    hits: Arc<AtomicUsize>,
    queries: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

async fn answer(
    State(s): State<FixtureState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let hit = s.hits.fetch_add(1, Ordering::SeqCst);
    let page: u32 = q.get("pagina").and_then(|p| p.parse().ok()).unwrap_or(0);
    s.queries.lock().unwrap().push(q);
    let reply = (s.script)(page, hit);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    (
        StatusCode::from_u16(reply.status).unwrap(),
        [(header::CONTENT_TYPE, reply.content_type)],
        reply.body,
    )
        .into_response()
}

pub async fn fixture(script: impl Fn(u32, usize) -> Reply + Send + Sync + 'static) -> Fixture {
    let state = FixtureState {
        script: Arc::new(script),
        hits: Arc::new(AtomicUsize::new(0)),
        queries: Arc::new(Mutex::new(Vec::new())),
    };
    let (hits, queries) = (state.hits.clone(), state.queries.clone());
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
        queries,
    }
}

fn recorded(name: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/pncp/");
    std::fs::read(format!("{path}{name}")).unwrap()
}

/// The ten real records of the recorded `publicacao` page (modality 8, SP).
pub fn records() -> Vec<Value> {
    let page: Value = serde_json::from_slice(&recorded(
        "02a_contratacoes_publicacao_mod8_SP_page1of71_raw.json",
    ))
    .unwrap();
    page["data"].as_array().unwrap().clone()
}

pub fn envelope(data: &[Value], page: u32, pages: u32) -> Vec<u8> {
    json!({
        "data": data,
        "totalRegistros": data.len() as u32 * pages,
        "totalPaginas": pages,
        "numeroPagina": page,
        "paginasRestantes": pages - page,
        "empty": false,
    })
    .to_string()
    .into_bytes()
}

/// A gateway whose `pncp` executor points at `fx`, politely fast for tests; `extra` settings
/// (`key = value` lines) replace the defaults of the same name.
async fn gateway(fx: &Fixture, extra: &str) -> TestApp {
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
        "name = \"pncp\"\nkind = \"collector\"\ntimeout_ms = 20000\n[settings]\n{}\n",
        settings.join("\n")
    );
    spawn_app_with(move |c| std::fs::write(c.executors_dir.join("pncp.toml"), file).unwrap()).await
}

fn collect(uf: &str) -> Value {
    json!({"action": "licitacoes.collect", "context_id": "work", "payload": {
        "source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-09-17",
        "data_final": "2026-09-17", "modalidade": 8, "uf": uf}})
}

async fn run(app: &TestApp, key: &str, uf: &str) -> (u16, Value) {
    let resp = app.process(Some(key), &collect(uf)).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
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

#[tokio::test]
async fn every_page_is_followed_duplicates_are_dropped_and_the_first_run_is_all_new() {
    let recs = records();
    let (a, b) = (recs[..5].to_vec(), recs[5..].to_vec());
    let fx = fixture(move |page, _| match page {
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
    assert_eq!(r["new"].as_array().unwrap().len(), 10);
    assert!(
        r["changed"].as_array().unwrap().is_empty() && r["not_seen"].as_array().unwrap().is_empty()
    );
    assert_eq!(r["records"].as_array().unwrap().len(), 10);
    let q = &fx.queries.lock().unwrap()[0];
    assert_eq!(q["dataInicial"], "20260917");
    assert_eq!(q["codigoModalidadeContratacao"], "8");
    assert_eq!(q["uf"], "SP");
    assert_eq!(q["tamanhoPagina"], "5");
}

#[tokio::test]
async fn a_204_is_an_empty_complete_run() {
    let fx = fixture(|_, _| Reply::status(204, "application/json", "")).await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (status, body) = run(&app, &key, "SP").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["complete"], true);
    assert_eq!(body["result"]["items"], 0);
}

#[tokio::test]
async fn a_400_is_not_retried_and_its_message_is_reported() {
    let fx = fixture(|_, _| {
        Reply::status(
            400,
            "application/json",
            recorded("05_error_400_missing_modalidade.json"),
        )
    })
    .await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (_, body) = run(&app, &key, "SP").await;
    let r = &body["result"];
    assert_eq!(r["complete"], false);
    let error = r["errors"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("HTTP 400") && error.contains("codigoModalidadeContratacao"),
        "{error}"
    );
    assert_eq!(fx.hits.load(Ordering::SeqCst), 1, "a 400 is not retried");
}

#[tokio::test]
async fn a_429_with_an_html_body_is_retried_then_succeeds() {
    let recs = records();
    let fx = fixture(move |_, hit| {
        if hit == 0 {
            Reply::status(429, "text/html", "<html><head><meta charset=\"UTF-8\"><title>Limite de Requisições Excedido</title></head></html>")
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
    let fx = fixture(|_, _| {
        Reply::status(
            500,
            "application/json",
            "Erro na comunicação com o banco de dados.",
        )
    })
    .await;
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
    assert!(
        error.contains("HTTP 500") && error.contains("after 3 attempts"),
        "{error}"
    );
    assert_eq!(fx.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_oversized_response_is_refused_clearly() {
    let fx = fixture(|_, _| Reply::json(recorded("01_contratos_page1of2_500rec_raw.json"))).await;
    let app = gateway(&fx, "max_response_bytes = 100000\n").await;
    let key = app.admin_key().await;
    let (_, body) = run(&app, &key, "SP").await;
    let error = body["result"]["errors"][0]["error"].as_str().unwrap();
    assert!(error.contains("larger than 100000 bytes"), "{error}");
    assert_eq!(body["result"]["complete"], false);
}

#[tokio::test]
async fn a_page_that_never_answers_times_out_and_is_retried() {
    let fx = fixture(|_, _| Reply {
        delay: Duration::from_secs(3),
        ..Reply::json(envelope(&[], 1, 1))
    })
    .await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (_, body) = run(&app, &key, "SP").await;
    let error = body["result"]["errors"][0]["error"].as_str().unwrap();
    assert!(error.contains("no answer within 500 ms"), "{error}");
    assert_eq!(fx.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_second_run_reports_new_changed_and_not_seen_against_the_last_complete_run() {
    let recs = records();
    let round = Arc::new(AtomicUsize::new(0));
    let r2 = round.clone();
    let fx = fixture(move |_, _| {
        let mut data = recs[..6].to_vec();
        match r2.load(Ordering::SeqCst) {
            0 => {}
            // Round 2: record 0 changes its value and object, record 5 disappears, record 6 appears.
            1 => {
                data[0]["valorTotalEstimado"] = json!(999.99);
                data[0]["objetoCompra"] = json!("objeto alterado");
                data[5] = recs[6].clone();
            }
            // Round 3: the source fails mid-way: a partial run.
            _ => return Reply::status(503, "text/plain", "Service Unavailable"),
        }
        Reply::json(envelope(&data, 1, 1))
    })
    .await;
    let app = gateway(&fx, "max_retries = 0\n").await;
    let key = app.admin_key().await;
    let id = |i: usize| {
        records()[i]["numeroControlePNCP"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    let (_, first) = run(&app, &key, "SP").await;
    assert_eq!(first["result"]["new"].as_array().unwrap().len(), 6);
    round.store(1, Ordering::SeqCst);
    let (_, second) = run(&app, &key, "SP").await;
    let r = &second["result"];
    assert_eq!(r["baseline_run_id"], first["result"]["run_id"]);
    assert_eq!(ids(&r["new"]), vec![id(6)]);
    assert_eq!(ids(&r["not_seen"]), vec![id(5)]);
    assert_eq!(
        r["changed"],
        json!([{"id": id(0), "fields": ["objetoCompra", "valorTotalEstimado"]}])
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
async fn a_concurrent_run_of_the_same_query_is_refused_clearly() {
    let recs = records();
    let fx = fixture(move |_, _| Reply {
        delay: Duration::from_millis(400),
        ..Reply::json(envelope(&recs[..2], 1, 1))
    })
    .await;
    let app = gateway(&fx, "").await;
    let key = app.admin_key().await;
    let (slow, fast) = tokio::join!(run(&app, &key, "SP"), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        run(&app, &key, "SP").await
    });
    assert_eq!(slow.0, 200, "{}", slow.1);
    assert_eq!(fast.0, 502, "{}", fast.1);
    assert!(
        fast.1["message"]
            .as_str()
            .unwrap()
            .contains("already in progress"),
        "{}",
        fast.1
    );
    // Another query is not blocked by it.
    assert_eq!(run(&app, &key, "RJ").await.0, 200);
}

#[tokio::test]
async fn a_switched_off_source_is_refused_and_counted() {
    let fx = fixture(|_, _| Reply::json(envelope(&[], 1, 1))).await;
    let app = gateway(&fx, "enabled = false\n").await;
    let key = app.admin_key().await;
    let (status, body) = run(&app, &key, "SP").await;
    assert_eq!(status, 502);
    assert!(
        body["message"].as_str().unwrap().contains("switched off"),
        "{body}"
    );
    assert_eq!(fx.hits.load(Ordering::SeqCst), 0);
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics
            .contains(r#"catraca_collector_refusals_total{executor="pncp",reason="disabled"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn pages_are_cached_for_their_ttl() {
    let recs = records();
    let fx = fixture(move |_, _| Reply::json(envelope(&recs[..2], 1, 1))).await;
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
