//! The `collector` kind: HTTP data collection, first source the PNCP consultation API
//! (`/v1/contratacoes/{publicacao|atualizacao}`). Follows every page; treats 204 and empty bodies as
//! empty pages; retries HTML and non-JSON bodies, 429 and 5xx with backoff; spaces requests per source;
//! refuses oversized responses; caches pages for a TTL; deduplicates by `numeroControlePNCP`; and diffs
//! against the previous **complete** run of the same query (new / changed / not seen). One run per
//! source and query at a time, across instances (a lock row in the database), and a kill switch.
//! A partial run returns what it got with `complete: false` and is never a baseline, so an outage
//! never reports the whole market as vanished.
//!
//! `CATRACA_PNCP_BASE_URL`, when set and not empty, overrides the `base_url` of every PNCP collector
//! (it points at `…/api/consulta`); the configuration reads it and hands it over in
//! `ExecutorEnv::overrides`.
//!
//! Files: `source.rs` (the HTTP source behind the `PageSource` trait, politeness, retries, cache, the page
//! envelope), `diff.rs` (snapshots and their diff), and this one: settings, the run lock and the run.

mod diff;
mod source;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use self::diff::{Diff, snapshot_of};
use self::source::{HttpSource, PagePolicy, Pages};
use super::{Executor, ExecutorCall, ExecutorError, ExecutorSpec};
use crate::event::timestamp;
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
    #[serde(deserialize_with = "whole_u32")]
    modalidade: u32,
    uf: Option<String>,
    cnpj: Option<String>,
    codigo_municipio_ibge: Option<String>,
}

/// A `u32` also when written `8.0`, which the action's `"type": "integer"` admits.
fn whole_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let value = Value::deserialize(d)?;
    super::whole_number(&value)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| serde::de::Error::custom(format!("{value} is not a whole number in u32")))
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

/// A page the collector could not read, and why.
#[derive(Debug, Clone)]
struct PageError {
    page: u32,
    error: String,
}

struct Collector {
    name: String,
    settings: Settings,
    pages: Pages,
    store: Option<Arc<dyn Store>>,
    metrics: Option<Metrics>,
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
    if let Some(url) = &spec.env.overrides.pncp_base_url {
        settings.base_url.clone_from(url);
    }
    settings.base_url = settings.base_url.trim_end_matches('/').to_owned();
    if !(1..=500).contains(&settings.page_size) || settings.max_pages == 0 {
        return Err("page_size must be 1..=500 and max_pages positive".into());
    }
    let source = Arc::new(HttpSource::new(
        settings.request_timeout_ms,
        settings.max_response_bytes,
    )?);
    let pages = Pages::new(
        spec.name,
        source,
        PagePolicy {
            min_interval: Duration::from_millis(settings.min_interval_ms),
            page_size: settings.page_size,
            max_retries: settings.max_retries,
            retry_backoff: Duration::from_millis(settings.retry_backoff_ms),
            cache_ttl: Duration::from_secs(settings.cache_ttl_secs),
        },
    );
    if let Some(m) = &spec.env.metrics {
        // Every outcome's series exists from the start, so a rate over the first failures is not lost.
        for outcome in ["complete", "partial", "failed"] {
            m.collector_runs.with_label_values(&[spec.name, outcome]);
        }
    }
    Ok(Arc::new(Collector {
        name: spec.name.to_owned(),
        settings,
        pages,
        store: spec.env.store.clone(),
        metrics: spec.env.metrics.clone(),
        run_budget: spec.timeout,
    }))
}

impl Collector {
    /// Counts a run that fetched: `complete` (every page read), `partial` (a result with pages
    /// missing) or `failed` (no result).
    fn count_run(&self, outcome: &Result<Value, ExecutorError>) {
        let label = match outcome {
            Ok(result) if result["complete"] == Value::Bool(true) => "complete",
            Ok(_) => "partial",
            Err(_) => "failed",
        };
        if let Some(m) = &self.metrics {
            m.collector_runs
                .with_label_values(&[self.name.as_str(), label])
                .inc();
        }
    }

    fn count_refusal(&self, reason: &str) {
        if let Some(m) = &self.metrics {
            m.collector_refusals
                .with_label_values(&[self.name.as_str(), reason])
                .inc();
        }
    }
}

#[async_trait]
impl Executor for Collector {
    #[tracing::instrument(skip_all, fields(executor = %self.name, trace_id = %call.trace_id))]
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
            .collect(
                store.as_ref(),
                &query,
                &query_key,
                &run_id,
                call.trace_id.as_str(),
                started,
            )
            .await;
        self.count_run(&outcome);
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
        trace_id: &str,
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
            match self.pages.page(&url, &params, page).await {
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
        let snapshot: Vec<SnapshotRow> = records
            .iter()
            .map(|(id, r)| snapshot_of(id, r))
            .collect::<Result<_, _>>()
            .map_err(|e| ExecutorError::Failed(format!("record {e}")))?;
        let baseline = store
            .collector_baseline(&self.settings.source, query_key)
            .await
            .map_err(|e| ExecutorError::Failed(format!("database: {e}")))?;
        let diff = Diff::between(
            baseline
                .as_ref()
                .map_or(&[][..], |(_, rows)| rows.as_slice()),
            &snapshot,
            complete,
        )
        .map_err(|e| ExecutorError::Failed(format!("baseline {e}")))?;
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
            trace_id: Some(trace_id.to_owned()),
        };
        store
            .save_collector_run(&run, &snapshot)
            .await
            .map_err(|e| ExecutorError::Failed(format!("database: {e}")))?;
        let wanted: BTreeSet<&str> = diff
            .new
            .iter()
            .filter_map(Value::as_str)
            .chain(diff.changed.iter().filter_map(|c| c["id"].as_str()))
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
            "new": diff.new,
            "changed": diff.changed,
            "not_seen": diff.not_seen,
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
    fn a_modality_written_with_a_zero_fraction_is_the_same_query() {
        let q: PncpQuery = serde_json::from_value(json!({
            "source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-09-17",
            "data_final": "2026-09-17", "modalidade": 8.0
        }))
        .unwrap();
        assert_eq!(q.modalidade, 8);
        let fraction = serde_json::from_value::<PncpQuery>(json!({
            "source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-09-17",
            "data_final": "2026-09-17", "modalidade": 8.5
        }));
        assert!(fraction.is_err());
    }
}
