//! The metric catalogue of DESIGN.md in an owned registry. Label values come only from fixed enums or
//! the loaded configuration, never from request data, so the number of series stays bounded.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds) from 0.5 ms to 30 s: gates take microseconds, LLM calls tens of seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Gate buckets (seconds) from 10 µs: most gates are in-memory; the auth gate's argon2 miss is ~50 ms.
const GATE_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
];

/// Every metric the gateway exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub gate_decisions: IntCounterVec,
    pub gate_duration: HistogramVec,
    pub executor_calls: IntCounterVec,
    pub executor_duration: HistogramVec,
    pub action_results: IntCounterVec,
    pub llm_tokens: IntCounterVec,
    pub collector_refusals: IntCounterVec,
    pub collector_runs: IntCounterVec,
    pub audit_events: IntCounterVec,
    pub audit_write_failures: IntCounter,
    /// Signed checkpoints stored (and appended to the checkpoints file).
    pub checkpoints: IntCounter,
    /// Checkpoints a witness did not take after every retry (or that found its queue full).
    pub witness_failures: IntCounter,
    pub audit_flush_duration: Histogram,
    pub audit_queue_depth: IntGauge,
    /// 1 while the rate limiter can decide, 0 while its circuit is open.
    pub rate_limiter_available: IntGauge,
    pub build_info: IntGaugeVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: T,
) -> Result<T, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    labels,
                )?,
            )
        };
        let m = Self {
            requests_total: counter(
                "catraca_requests_total",
                "HTTP requests by route template, method and status",
                &["route", "method", "status"],
            )?,
            request_duration: histogram(
                "catraca_request_duration_seconds",
                "HTTP request latency by route template",
                &["route"],
                LATENCY_BUCKETS,
            )?,
            gate_decisions: counter(
                "catraca_gate_decisions_total",
                "Gate verdicts by gate, decision (allow|deny) and reason code (none when allowed)",
                &["gate", "decision", "reason"],
            )?,
            gate_duration: histogram(
                "catraca_gate_duration_seconds",
                "Time spent in each gate",
                &["gate"],
                GATE_BUCKETS,
            )?,
            executor_calls: counter(
                "catraca_executor_calls_total",
                "Executor calls by executor and status (success|failed|timeout)",
                &["executor", "status"],
            )?,
            executor_duration: histogram(
                "catraca_executor_duration_seconds",
                "Executor latency",
                &["executor"],
                LATENCY_BUCKETS,
            )?,
            action_results: counter(
                "catraca_action_results_total",
                "Outcome of /process by action (unknown when not in the policy) and status",
                &["action", "status"],
            )?,
            llm_tokens: counter(
                "catraca_llm_tokens_total",
                "Tokens used by LLM executors, by executor and kind (prompt|completion)",
                &["executor", "kind"],
            )?,
            collector_refusals: counter(
                "catraca_collector_refusals_total",
                "Collector runs refused before fetching, by executor and reason (disabled|busy)",
                &["executor", "reason"],
            )?,
            collector_runs: counter(
                "catraca_collector_runs_total",
                "Collector runs that fetched, by executor and outcome (complete|partial|failed)",
                &["executor", "outcome"],
            )?,
            audit_events: counter(
                "catraca_audit_events_total",
                "Audit events durably written, by event type",
                &["event_type"],
            )?,
            audit_write_failures: register(
                &r,
                IntCounter::new(
                    "catraca_audit_write_failures_total",
                    "Audit batches the store refused; each one made requests fail closed",
                )?,
            )?,
            checkpoints: register(
                &r,
                IntCounter::new(
                    "catraca_checkpoints_total",
                    "Signed checkpoints of audit chains stored",
                )?,
            )?,
            witness_failures: register(
                &r,
                IntCounter::new(
                    "catraca_witness_failures_total",
                    "Signed checkpoints the witness did not take (after retries) or that were dropped",
                )?,
            )?,
            audit_flush_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catraca_audit_flush_duration_seconds",
                        "Time to durably commit one audit batch",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            audit_queue_depth: register(
                &r,
                IntGauge::new(
                    "catraca_audit_queue_depth",
                    "Audit write requests waiting for the writer",
                )?,
            )?,
            rate_limiter_available: register(
                &r,
                IntGauge::new(
                    "catraca_rate_limiter_available",
                    "1 while the rate limiter answers, 0 while it is failing (circuit open)",
                )?,
            )?,
            build_info: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("catraca_build_info", "Build of the running gateway"),
                    &["version"],
                )?,
            )?,
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Number of exported series (each histogram counts once per label set); for boundedness tests.
    pub fn series_count(&self) -> usize {
        self.registry
            .gather()
            .iter()
            .map(|family| family.get_metric().len())
            .sum()
    }
}
