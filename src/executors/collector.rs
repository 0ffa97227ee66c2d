//! The `collector` kind: HTTP data collection, first source the PNCP consultation API
//! (`/v1/contratacoes/{publicacao|atualizacao}`). Follows every page; treats 204 and empty bodies as
//! empty pages; retries HTML and non-JSON bodies, 429 and 5xx with backoff; spaces requests per source;
//! refuses oversized responses; caches pages for a TTL; deduplicates by `numeroControlePNCP`; and diffs
//! against the previous **complete** run of the same query (new / changed / not seen). One run per
//! source and query at a time, across instances (a lock row in the database), and a kill switch.
//! A partial run returns what it got with `complete: false` and is never a baseline, so an outage
//! never reports the whole market as vanished.
//!
//! `CATRACA_PNCP_BASE_URL`, when set, overrides the `base_url` of every PNCP collector (it points at
//! `…/api/consulta`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{Executor, ExecutorCall, ExecutorError, ExecutorSpec};
use crate::audit::timestamp;
use crate::metrics::Metrics;
use crate::store::{CollectorRun, SnapshotRow, Store};

fn default_true() -> bool {
    true
}

/// The `[settings]` of a collector file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Only `pncp` for now.
    source: String,
    base_url: String,
    /// The kill switch: `false` refuses every run of this source, clearly and counted.
    #[serde(default = "default_true")]
    enabled: bool,
    /// Politeness towards the source: the PNCP API answers 429 above about one request per second.
    #[serde(default = "default_min_interval")]
    min_interval_ms: u64,
    #[serde(default = "default_request_timeout")]
    request_timeout_ms: u64,
    /// Larger responses are refused: a page of 50 tenders is ~100 KB; 10 MiB means something is wrong.
    #[serde(default = "default_max_response")]
    max_response_bytes: usize,
    /// PNCP accepts 10 to 50 records a page.
    #[serde(default = "default_page_size")]
    page_size: u32,
    /// Bounds one run: 200 pages of 50 is 10 000 tenders, a busy day for one modality nationwide.
    #[serde(default = "default_max_pages")]
    max_pages: u32,
    #[serde(default = "default_max_retries")]
    max_retries: u32,
    #[serde(default = "default_backoff")]
    retry_backoff_ms: u64,
    /// Pages fetched within this many seconds are reused (0 disables the cache).
    #[serde(default = "default_cache_ttl")]
    cache_ttl_secs: u64,
    /// Most new or changed records returned in full in `records` (the ids are always all listed).
    #[serde(default = "default_result_records")]
    result_records: usize,
    /// How long a run lock outlives the executor's `timeout_ms`, so the lock of a run that died
    /// (a crashed instance, an aborted task) lapses on its own.
    #[serde(default = "default_lock_margin")]
    lock_margin_ms: u64,
}

fn default_result_records() -> usize {
    100
}

fn default_min_interval() -> u64 {
    1_000
}
fn default_request_timeout() -> u64 {
    30_000
}
fn default_max_response() -> usize {
    10 * 1024 * 1024
}
fn default_page_size() -> u32 {
    50
}
fn default_max_pages() -> u32 {
    200
}
fn default_max_retries() -> u32 {
    4
}
fn default_backoff() -> u64 {
    2_000
}
fn default_cache_ttl() -> u64 {
    600
}
/// A minute past the executor's own timeout: a live holder has always finished or been aborted by
/// then, and a dead one blocks its query for little longer than a run would have taken.
fn default_lock_margin() -> u64 {
    60_000
}

/// Most cached pages kept per collector; the oldest are dropped first.
const CACHE_CAPACITY: usize = 1_000;

/// The HTTP side of a collector: one GET, answered with status, content type and a bounded body.
#[async_trait]
pub trait PageSource: Send + Sync {
    async fn get(&self, url: &str, query: &[(String, String)]) -> Result<Fetched, FetchError>;
}

/// A response as the collector needs it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("response larger than {0} bytes refused")]
    TooLarge(usize),
    #[error("unreachable: {0}")]
    Unreachable(String),
}

/// reqwest with an explicit timeout, no proxies, bounded body reads.
struct HttpSource {
    client: reqwest::Client,
    timeout_ms: u64,
    max_bytes: usize,
}

#[async_trait]
impl PageSource for HttpSource {
    async fn get(&self, url: &str, query: &[(String, String)]) -> Result<Fetched, FetchError> {
        let sent = self.client.get(url).query(query).send().await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(FetchError::Timeout(self.timeout_ms)),
            Err(e) => return Err(FetchError::Unreachable(e.without_url().to_string())),
        };
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_bytes {
                        return Err(FetchError::TooLarge(self.max_bytes));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(FetchError::Timeout(self.timeout_ms)),
                Err(e) => return Err(FetchError::Unreachable(e.without_url().to_string())),
            }
        }
        Ok(Fetched {
            status,
            content_type,
            body,
        })
    }
}

/// The PNCP query a payload asks for.
#[derive(Debug, Clone, Deserialize)]
struct PncpQuery {
    #[expect(
        dead_code,
        reason = "checked by the action's schema; kept so unknown fields stay errors"
    )]
    source: String,
    endpoint: String,
    data_inicial: String,
    data_final: String,
    modalidade: u32,
    uf: Option<String>,
    cnpj: Option<String>,
    codigo_municipio_ibge: Option<String>,
}

impl PncpQuery {
    /// Query parameters without the page: also the identity of the query (lock, baseline, cache).
    fn params(&self) -> Vec<(String, String)> {
        let date = |d: &str| d.replace('-', "");
        let mut p = vec![
            ("dataInicial".to_owned(), date(&self.data_inicial)),
            ("dataFinal".to_owned(), date(&self.data_final)),
            (
                "codigoModalidadeContratacao".to_owned(),
                self.modalidade.to_string(),
            ),
        ];
        if let Some(uf) = &self.uf {
            p.push(("uf".to_owned(), uf.clone()));
        }
        if let Some(cnpj) = &self.cnpj {
            p.push(("cnpj".to_owned(), cnpj.clone()));
        }
        if let Some(ibge) = &self.codigo_municipio_ibge {
            p.push(("codigoMunicipioIbge".to_owned(), ibge.clone()));
        }
        p
    }

    fn key(&self) -> String {
        let mut params = self.params();
        params.sort();
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}?{}", self.endpoint, query.join("&"))
    }
}

/// The PNCP pagination envelope.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    data: Vec<Value>,
    #[serde(default)]
    total_paginas: Option<u32>,
}

/// A page the collector could not read, and why.
#[derive(Debug, Clone)]
struct PageError {
    page: u32,
    error: String,
}

/// A cached page: when it was fetched and its body.
type CachedPage = (Instant, Arc<Vec<u8>>);

struct Cache {
    ttl: Duration,
    pages: Mutex<HashMap<String, CachedPage>>,
}

impl Cache {
    fn get(&self, key: &str) -> Option<Arc<Vec<u8>>> {
        let pages = self.pages.lock().ok()?;
        pages
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, body)| body.clone())
    }

    fn put(&self, key: String, body: Arc<Vec<u8>>) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut pages) = self.pages.lock() {
            if pages.len() >= CACHE_CAPACITY {
                let ttl = self.ttl;
                pages.retain(|_, (at, _)| at.elapsed() < ttl);
                if pages.len() >= CACHE_CAPACITY
                    && let Some(oldest) = pages
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(k, _)| k.clone())
                {
                    pages.remove(&oldest);
                }
            }
            pages.insert(key, (Instant::now(), body));
        }
    }
}

struct Collector {
    name: String,
    settings: Settings,
    source: Arc<dyn PageSource>,
    store: Option<Arc<dyn Store>>,
    metrics: Option<Metrics>,
    /// When the last request to the source was sent, to keep `min_interval_ms` between requests.
    last_request: tokio::sync::Mutex<Option<Instant>>,
    cache: Cache,
    /// The run lock lasts as long as the executor may run, plus `lock_margin_ms`.
    run_budget: Duration,
}

pub(super) fn build(spec: &ExecutorSpec<'_>) -> Result<Arc<dyn Executor>, String> {
    let mut settings: Settings = spec
        .settings
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| format!("collector settings: {}", e.message()))?;
    if settings.source != "pncp" {
        return Err(format!(
            "collector source {:?} is not supported (known: pncp)",
            settings.source
        ));
    }
    if let Some(url) = crate::config::env_var("CATRACA_PNCP_BASE_URL")
        && !url.is_empty()
    {
        settings.base_url = url;
    }
    settings.base_url = settings.base_url.trim_end_matches('/').to_owned();
    if !(1..=500).contains(&settings.page_size) || settings.max_pages == 0 {
        return Err("page_size must be 1..=500 and max_pages positive".into());
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.request_timeout_ms))
        .connect_timeout(Duration::from_millis(
            settings.request_timeout_ms.min(10_000),
        ))
        .no_proxy()
        .user_agent(concat!("catraca/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let source = Arc::new(HttpSource {
        client,
        timeout_ms: settings.request_timeout_ms,
        max_bytes: settings.max_response_bytes,
    });
    Ok(Arc::new(Collector {
        name: spec.name.to_owned(),
        cache: Cache {
            ttl: Duration::from_secs(settings.cache_ttl_secs),
            pages: Mutex::new(HashMap::new()),
        },
        settings,
        source,
        store: spec.env.store.clone(),
        metrics: spec.env.metrics.clone(),
        last_request: tokio::sync::Mutex::new(None),
        run_budget: spec.timeout,
    }))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn canonical(v: &Value) -> Vec<u8> {
    serde_json_canonicalizer::to_vec(v).unwrap_or_default()
}

/// Hash of the whole record and of each top-level field, both over canonical JSON (so key order and
/// whitespace of the source never count as a change).
fn snapshot_of(id: &str, record: &Value) -> SnapshotRow {
    let fields: BTreeMap<&str, String> = record
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.as_str(), sha256_hex(&canonical(v))))
                .collect()
        })
        .unwrap_or_default();
    SnapshotRow {
        record_id: id.to_owned(),
        content_hash: sha256_hex(&canonical(record)),
        field_hashes: serde_json::to_string(&fields).unwrap_or_default(),
    }
}

fn changed_fields(before: &str, after: &str) -> Vec<String> {
    let parse = |s: &str| serde_json::from_str::<BTreeMap<String, String>>(s).unwrap_or_default();
    let (a, b) = (parse(before), parse(after));
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

impl Collector {
    fn count_refusal(&self, reason: &str) {
        if let Some(m) = &self.metrics {
            m.collector_refusals
                .with_label_values(&[self.name.as_str(), reason])
                .inc();
        }
    }

    async fn wait_turn(&self) {
        let mut last = self.last_request.lock().await;
        let interval = Duration::from_millis(self.settings.min_interval_ms);
        if let Some(at) = *last {
            let since = at.elapsed();
            if since < interval {
                tokio::time::sleep(interval - since).await;
            }
        }
        *last = Some(Instant::now());
    }

    /// One page, with retries; `Ok(None)` is an empty page (204 or empty body).
    async fn page(
        &self,
        url: &str,
        params: &[(String, String)],
        page: u32,
    ) -> Result<Option<Envelope>, String> {
        let mut query = params.to_vec();
        query.push(("pagina".to_owned(), page.to_string()));
        query.push((
            "tamanhoPagina".to_owned(),
            self.settings.page_size.to_string(),
        ));
        let cache_key = format!(
            "{url}?{}",
            serde_json::to_string(&query).unwrap_or_default()
        );
        if let Some(body) = self.cache.get(&cache_key) {
            return parse_page(&body).map_err(|e| format!("cached page: {e}"));
        }
        let mut attempt = 0;
        let mut backoff = Duration::from_millis(self.settings.retry_backoff_ms);
        loop {
            self.wait_turn().await;
            let error = match self.source.get(url, &query).await {
                Err(FetchError::TooLarge(n)) => {
                    return Err(format!("response larger than {n} bytes refused"));
                }
                Err(e) => e.to_string(),
                Ok(f) if f.status == 204 => return Ok(None),
                Ok(f) if f.status == 429 || f.status >= 500 => {
                    format!("HTTP {}: {}", f.status, snippet(&f.body))
                }
                Ok(f) if f.status >= 400 => {
                    // The source says the query is wrong; asking again will not help.
                    return Err(format!("HTTP {}: {}", f.status, error_message(&f.body)));
                }
                Ok(f) => match parse_page(&f.body) {
                    Ok(page) => {
                        self.cache.put(cache_key, Arc::new(f.body));
                        return Ok(page);
                    }
                    // HTML or plain text with a 200: a proxy or a maintenance page; try again.
                    Err(e) => format!("HTTP {} ({}): {e}", f.status, f.content_type),
                },
            };
            if attempt >= self.settings.max_retries {
                return Err(format!("{error} (after {} attempts)", attempt + 1));
            }
            attempt += 1;
            tracing::warn!(collector = %self.name, page, attempt, %error, "page failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }
}

/// A short, single-line excerpt of a body for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(120).collect()
}

/// The `message` of a Spring Boot error body, else a snippet.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| snippet(body))
}

fn parse_page(body: &[u8]) -> Result<Option<Envelope>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if body.trim_ascii_start().first() == Some(&b'<') {
        return Err("an HTML body instead of JSON".into());
    }
    serde_json::from_slice::<Envelope>(body)
        .map(Some)
        .map_err(|e| format!("not a PNCP page: {e}"))
}

#[async_trait]
impl Executor for Collector {
    async fn execute(&self, call: ExecutorCall) -> Result<Value, ExecutorError> {
        if !self.settings.enabled {
            self.count_refusal("disabled");
            return Err(ExecutorError::Failed(format!(
                "source {} is switched off (enabled = false in the {} executor file)",
                self.settings.source, self.name
            )));
        }
        let Some(store) = &self.store else {
            return Err(ExecutorError::Failed(
                "the collector needs the database".into(),
            ));
        };
        let query: PncpQuery = serde_json::from_value(call.payload.clone())
            .map_err(|e| ExecutorError::Failed(format!("payload is not a PNCP query: {e}")))?;
        let query_key = query.key();
        let run_id = uuid::Uuid::now_v7().to_string();
        let started = OffsetDateTime::now_utc();
        let expires =
            started + self.run_budget + Duration::from_millis(self.settings.lock_margin_ms);
        let store_err =
            |e: crate::store::StoreError| ExecutorError::Failed(format!("database: {e}"));
        if let Some(holder) = store
            .acquire_collector_lock(
                &self.settings.source,
                &query_key,
                &run_id,
                &timestamp(started),
                &timestamp(expires),
            )
            .await
            .map_err(store_err)?
        {
            self.count_refusal("busy");
            return Err(ExecutorError::Failed(format!(
                "a run of {} for this query is already in progress (run {}, started {})",
                self.settings.source, holder.run_id, holder.acquired_at
            )));
        }
        let outcome = self
            .collect(store.as_ref(), &query, &query_key, &run_id, started)
            .await;
        if let Err(e) = store
            .release_collector_lock(&self.settings.source, &query_key, &run_id)
            .await
        {
            tracing::error!(error = %e, "could not release the collector lock; it lapses on its own");
        }
        outcome
    }
}

impl Collector {
    async fn collect(
        &self,
        store: &dyn Store,
        query: &PncpQuery,
        query_key: &str,
        run_id: &str,
        started: OffsetDateTime,
    ) -> Result<Value, ExecutorError> {
        if !matches!(query.endpoint.as_str(), "publicacao" | "atualizacao") {
            return Err(ExecutorError::Failed(format!(
                "endpoint {:?} is not publicacao or atualizacao",
                query.endpoint
            )));
        }
        let url = format!(
            "{}/v1/contratacoes/{}",
            self.settings.base_url, query.endpoint
        );
        let params = query.params();
        let mut records: Vec<(String, Value)> = Vec::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut duplicates = 0u64;
        let mut errors: Vec<PageError> = Vec::new();
        let mut pages_read = 0u32;
        let mut total_pages = 1u32;
        let mut page = 1u32;
        while page <= total_pages {
            if page > self.settings.max_pages {
                errors.push(PageError {
                    page,
                    error: format!("more than max_pages = {} pages", self.settings.max_pages),
                });
                break;
            }
            match self.page(&url, &params, page).await {
                Ok(None) => {
                    pages_read += 1;
                    break;
                }
                Ok(Some(envelope)) => {
                    pages_read += 1;
                    total_pages = envelope.total_paginas.unwrap_or(page).max(page);
                    if envelope.data.is_empty() {
                        break;
                    }
                    for record in envelope.data {
                        let Some(id) = record
                            .get("numeroControlePNCP")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                        else {
                            errors.push(PageError {
                                page,
                                error: "a record without numeroControlePNCP was skipped".into(),
                            });
                            continue;
                        };
                        if seen.insert(id.clone()) {
                            records.push((id, record));
                        } else {
                            duplicates += 1;
                        }
                    }
                }
                Err(error) => {
                    errors.push(PageError { page, error });
                    break;
                }
            }
            page += 1;
        }
        let complete = !errors
            .iter()
            .any(|e| !e.error.starts_with("a record without"))
            && pages_read >= total_pages.min(1);
        let snapshot: Vec<SnapshotRow> = records.iter().map(|(id, r)| snapshot_of(id, r)).collect();
        let baseline = store
            .collector_baseline(&self.settings.source, query_key)
            .await
            .map_err(|e| ExecutorError::Failed(format!("database: {e}")))?;
        let before: HashMap<&str, &SnapshotRow> = baseline
            .as_ref()
            .map(|(_, rows)| rows.iter().map(|r| (r.record_id.as_str(), r)).collect())
            .unwrap_or_default();
        let mut new = Vec::new();
        let mut changed = Vec::new();
        for row in &snapshot {
            match before.get(row.record_id.as_str()) {
                None => new.push(Value::String(row.record_id.clone())),
                Some(old) if old.content_hash != row.content_hash => changed.push(json!({
                    "id": row.record_id,
                    "fields": changed_fields(&old.field_hashes, &row.field_hashes),
                })),
                Some(_) => {}
            }
        }
        // Only a complete run may say a record is gone; a partial one simply did not reach it.
        let not_seen: Vec<Value> = if complete {
            let now: BTreeSet<&str> = snapshot.iter().map(|r| r.record_id.as_str()).collect();
            let mut gone: Vec<&str> = before
                .keys()
                .copied()
                .filter(|id| !now.contains(id))
                .collect();
            gone.sort_unstable();
            gone.into_iter()
                .map(|id| Value::String(id.to_owned()))
                .collect()
        } else {
            Vec::new()
        };
        let error_values: Vec<Value> = errors
            .iter()
            .map(|e| json!({"page": e.page, "error": e.error}))
            .collect();
        let run = CollectorRun {
            run_id: run_id.to_owned(),
            source: self.settings.source.clone(),
            query_key: query_key.to_owned(),
            started_at: timestamp(started),
            finished_at: timestamp(OffsetDateTime::now_utc()),
            complete,
            pages: i64::from(pages_read),
            items: snapshot.len() as i64,
            errors: Value::Array(error_values.clone()).to_string(),
        };
        store
            .save_collector_run(&run, &snapshot)
            .await
            .map_err(|e| ExecutorError::Failed(format!("database: {e}")))?;
        let wanted: BTreeSet<&str> = new
            .iter()
            .filter_map(Value::as_str)
            .chain(changed.iter().filter_map(|c| c["id"].as_str()))
            .collect();
        let fresh: Vec<&Value> = records
            .iter()
            .filter(|(id, _)| wanted.contains(id.as_str()))
            .map(|(_, r)| r)
            .collect();
        let records_truncated = fresh.len() > self.settings.result_records;
        let records_out: Vec<&Value> = fresh
            .into_iter()
            .take(self.settings.result_records)
            .collect();
        Ok(json!({
            "run_id": run_id,
            "source": self.settings.source,
            "query": query_key,
            "complete": complete,
            "pages": pages_read,
            "items": run.items,
            "duplicates": duplicates,
            "baseline_run_id": baseline.map(|(id, _)| id),
            "new": new,
            "changed": changed,
            "not_seen": not_seen,
            "errors": error_values,
            "records": records_out,
            "records_truncated": records_truncated,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_key_ignores_parameter_order_and_maps_dates() {
        let q: PncpQuery = serde_json::from_value(json!({
            "source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-09-17",
            "data_final": "2026-09-17", "modalidade": 8, "uf": "SP"
        }))
        .unwrap();
        assert_eq!(
            q.key(),
            "publicacao?codigoModalidadeContratacao=8&dataFinal=20260917&dataInicial=20260917&uf=SP"
        );
    }

    #[test]
    fn field_hashes_name_what_changed() {
        let a = snapshot_of("x", &json!({"valor": 1, "objeto": "a", "gone": true}));
        let b = snapshot_of("x", &json!({"objeto": "a", "valor": 2, "new": 1}));
        assert_ne!(a.content_hash, b.content_hash);
        assert_eq!(
            changed_fields(&a.field_hashes, &b.field_hashes),
            ["gone", "new", "valor"]
        );
        let c = snapshot_of("x", &json!({"objeto": "a", "valor": 1, "gone": true}));
        assert_eq!(a.content_hash, c.content_hash, "key order is not a change");
    }

    #[test]
    fn html_plain_text_and_empty_bodies_are_told_apart() {
        assert!(parse_page(b"").unwrap().is_none());
        assert!(parse_page(b"  <html><body>Limite</body></html>").is_err());
        assert!(parse_page("Erro na comunicação com o banco de dados.".as_bytes()).is_err());
        let p = parse_page(br#"{"data":[{"numeroControlePNCP":"1"}],"totalPaginas":3}"#)
            .unwrap()
            .unwrap();
        assert_eq!(p.total_paginas, Some(3));
    }
}
