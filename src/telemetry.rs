//! OpenTelemetry traces, on only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: each request becomes a server span under the request's
//! trace id, with a child span for each gate, each audit commit and each executor run, exported over
//! OTLP/HTTP (protobuf) by the SDK's batch processor. Executors send `traceparent` to their upstreams,
//! naming their own span.
//!
//! The turnstile already measures what the spans say (each gate's verdict and time, each commit, each
//! executor run), so spans are recorded as finished facts into the request's [`Recorder`], reached
//! through a task-local, and handed to the processor when the response is ready. When tracing is off
//! no recorder exists: every `record` is one task-local lookup that finds nothing.
//!
//! The other `OTEL_*` variables of the specification (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`) are honoured by the SDK.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId as OtelTraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::EnvResourceDetector;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, SpanData, SpanEvents, SpanLinks, SpanProcessor as _,
};
use sha2::{Digest as _, Sha256};

use crate::domain::TraceId;

/// The variables that turn tracing on.
pub const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// The exporter of a gateway that traces.
pub struct Telemetry {
    processor: BatchSpanProcessor<Tokio>,
    scope: InstrumentationScope,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// The exporter named by the environment, or `None` when tracing is off. Must be called within
    /// the tokio runtime (the batch processor's task starts on it).
    pub fn from_env(instance_id: &str) -> anyhow::Result<Option<Arc<Self>>> {
        let on = ENDPOINT_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if !on {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
            .context("OTEL_EXPORTER_OTLP_ENDPOINT: building the OTLP exporter")?;
        let mut processor = BatchSpanProcessor::builder(exporter, Tokio).build();
        // The defaults, then OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (the detectors of
        // `Resource::builder`), which take precedence.
        let mut builder = Resource::builder_empty()
            .with_service_name("catraca")
            .with_attribute(KeyValue::new("service.instance.id", instance_id.to_owned()))
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_detectors(&[Box::new(EnvResourceDetector::new())]);
        if let Some(name) = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
        {
            builder = builder.with_service_name(name);
        }
        let resource = builder.build();
        processor.set_resource(&resource);
        let scope = InstrumentationScope::builder("catraca")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        Ok(Some(Arc::new(Self { processor, scope })))
    }

    /// The recorder of a request: its spans go under `trace_id` (the request's W3C trace id, or one
    /// derived from a trace id of another form), as children of the caller's span when `traceparent`
    /// names one.
    pub fn start(&self, trace_id: &TraceId, traceparent: Option<&str>) -> Current {
        let ids = RandomIdGenerator::default();
        let recorder = Arc::new(Recorder {
            trace: otel_trace_id(trace_id),
            root: ids.new_span_id(),
            caller: traceparent.and_then(|t| parent_span_of(t, trace_id)),
            started: SystemTime::now(),
            spans: Mutex::new(Vec::with_capacity(8)),
            scope: self.scope.clone(),
            derived_from: (!is_w3c(trace_id)).then(|| trace_id.to_string()),
        });
        Current {
            parent: recorder.root,
            recorder,
        }
    }

    /// Ends the request's span with what the client got, and hands every span to the exporter.
    pub fn finish(&self, current: &Current, name: String, attributes: Vec<KeyValue>, status: u16) {
        let rec = &current.recorder;
        let mut attributes = attributes;
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(original) = &rec.derived_from {
            attributes.push(KeyValue::new("catraca.trace_id", original.clone()));
        }
        let root = SpanData {
            span_context: rec.context(rec.root),
            parent_span_id: rec.caller.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: rec.caller.is_some(),
            span_kind: SpanKind::Server,
            name: Cow::Owned(name),
            start_time: rec.started,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if status >= 500 {
                Status::error(format!("HTTP {status}"))
            } else {
                Status::Unset
            },
            instrumentation_scope: rec.scope.clone(),
        };
        let children = std::mem::take(&mut *lock(&rec.spans));
        for span in children.into_iter().chain(std::iter::once(root)) {
            self.processor.on_end(span);
        }
    }

    /// Exports what is queued; waits at most `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.processor.shutdown_with_timeout(timeout) {
            tracing::warn!(error = %e, "OpenTelemetry spans not all exported at shutdown");
        }
    }
}

/// The spans of one request, collected as they finish.
#[derive(Debug)]
pub struct Recorder {
    trace: OtelTraceId,
    root: SpanId,
    caller: Option<SpanId>,
    started: SystemTime,
    spans: Mutex<Vec<SpanData>>,
    scope: InstrumentationScope,
    /// The request's own trace id when it is not a W3C one (the span carries it as an attribute).
    derived_from: Option<String>,
}

impl Recorder {
    fn context(&self, span: SpanId) -> SpanContext {
        SpanContext::new(
            self.trace,
            span,
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where spans recorded now go: the request's recorder and the span they are children of.
#[derive(Debug, Clone)]
pub struct Current {
    recorder: Arc<Recorder>,
    parent: SpanId,
}

tokio::task_local! {
    static CURRENT: Option<Current>;
}

/// Runs `fut` with `current` as the place its spans go (`None`: not traced).
pub fn within<F: Future>(current: Option<Current>, fut: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(current, fut)
}

/// Where spans recorded now go, if this request is traced.
pub fn current() -> Option<Current> {
    CURRENT.try_with(Clone::clone).ok().flatten()
}

/// The W3C `traceparent` an upstream call made now should carry: this request's trace id and the
/// span of the executor making it. `None` when not traced.
pub fn traceparent() -> Option<String> {
    current().map(|c| format!("00-{}-{}-01", c.recorder.trace, c.parent))
}

/// Records a finished child span of the current span, which started at `started` and ends now.
/// `attributes` is called only when the request is traced.
pub fn record(
    name: impl FnOnce() -> Cow<'static, str>,
    started: Instant,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    error: Option<&dyn std::fmt::Display>,
) {
    let Some(current) = current() else { return };
    let id = RandomIdGenerator::default().new_span_id();
    push(&current, id, name(), started, attributes(), error);
}

fn push(
    current: &Current,
    id: SpanId,
    name: Cow<'static, str>,
    started: Instant,
    attributes: Vec<KeyValue>,
    error: Option<&dyn std::fmt::Display>,
) {
    let rec = &current.recorder;
    let end_time = SystemTime::now();
    let span = SpanData {
        span_context: rec.context(id),
        parent_span_id: current.parent,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name,
        start_time: end_time.checked_sub(started.elapsed()).unwrap_or(end_time),
        end_time,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: error.map_or(Status::Unset, |e| Status::error(e.to_string())),
        instrumentation_scope: rec.scope.clone(),
    };
    lock(&rec.spans).push(span);
}

/// A span whose children (and upstream calls) happen before it ends: an executor's run.
pub struct Open {
    inner: Option<(Current, SpanId)>,
    started: Instant,
}

impl Open {
    /// Opens a child of the current span (nothing when not traced).
    pub fn new() -> Self {
        let inner = current().map(|c| {
            let id = RandomIdGenerator::default().new_span_id();
            (c, id)
        });
        Self {
            inner,
            started: Instant::now(),
        }
    }

    /// Whether the request is traced.
    pub fn traced(&self) -> bool {
        self.inner.is_some()
    }

    /// Where spans recorded inside this one go (for [`within`]).
    pub fn inside(&self) -> Option<Current> {
        self.inner.as_ref().map(|(c, id)| Current {
            recorder: c.recorder.clone(),
            parent: *id,
        })
    }

    /// Ends the span now.
    pub fn end(
        self,
        name: impl FnOnce() -> Cow<'static, str>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
        error: Option<&dyn std::fmt::Display>,
    ) {
        if let Some((current, id)) = self.inner {
            push(&current, id, name(), self.started, attributes(), error);
        }
    }
}

impl Default for Open {
    fn default() -> Self {
        Self::new()
    }
}

fn is_w3c(trace_id: &TraceId) -> bool {
    let s = trace_id.as_str();
    s.len() == 32
        && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && s != "0".repeat(32)
}

/// The request's trace id as an OpenTelemetry one: itself when it is W3C (32 lowercase hex, as every
/// trace id the gateway makes or takes from `traceparent`), else the first 16 bytes of its SHA-256
/// (a client's own `X-Trace-Id`), so the same id always lands in the same trace.
fn otel_trace_id(trace_id: &TraceId) -> OtelTraceId {
    if is_w3c(trace_id)
        && let Ok(id) = OtelTraceId::from_hex(trace_id.as_str())
    {
        return id;
    }
    let digest = Sha256::digest(trace_id.as_str().as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    OtelTraceId::from_bytes(bytes)
}

/// The caller's span id in a well-formed `traceparent` (`00-<trace>-<span>-<flags>`) of this very
/// trace (a header the trace id was not taken from names no parent of ours).
fn parent_span_of(traceparent: &str, trace_id: &TraceId) -> Option<SpanId> {
    let mut parts = traceparent.trim().split('-');
    let (_, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    if trace != trace_id.as_str() || span.len() != 16 {
        return None;
    }
    SpanId::from_hex(span)
        .ok()
        .filter(|id| *id != SpanId::INVALID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_w3c_trace_id_is_kept_and_any_other_maps_to_a_stable_one() {
        let w3c = TraceId::parse("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        assert_eq!(
            otel_trace_id(&w3c).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let own = TraceId::parse("client-trace-0001").unwrap();
        let mapped = otel_trace_id(&own);
        assert_eq!(mapped, otel_trace_id(&own), "the same id, the same trace");
        assert_ne!(mapped, OtelTraceId::INVALID);
        assert_ne!(mapped.to_string(), otel_trace_id(&w3c).to_string());
    }

    #[test]
    fn the_callers_span_is_read_from_a_well_formed_traceparent_only() {
        let ours = TraceId::parse("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let other = TraceId::parse("0af7651916cd43dd8448eb211c80319c").unwrap();
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parent_span_of(header, &ours),
            Some(SpanId::from_hex("00f067aa0ba902b7").unwrap())
        );
        assert_eq!(parent_span_of(header, &other), None, "another trace's span");
        assert_eq!(
            parent_span_of(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                &ours
            ),
            None
        );
        assert_eq!(parent_span_of("garbage", &ours), None);
    }

    #[tokio::test]
    async fn nothing_is_recorded_and_no_traceparent_is_made_outside_a_traced_request() {
        assert!(traceparent().is_none());
        record(
            || "gate".into(),
            Instant::now(),
            || unreachable!("not traced: no attributes"),
            None,
        );
        within(None, async {
            assert!(current().is_none());
            assert!(traceparent().is_none());
        })
        .await;
    }
}
