//! The turnstile in steps, for every door a request comes in by (`/process`, the OpenAI facade, the
//! MCP server): [`admit`] runs G1 and G2, [`Admitted`] reads the body and names what is asked (G3),
//! [`Admitted::authorize`] runs the policy's half of G3, G4 and the kill switch, and [`Allowed::start`]
//! makes the ALLOW durable, runs the executor and makes its outcome durable, in a task of its own. Each
//! step that refuses records the refusal (REQUEST_START, DECISION deny, REQUEST_END) before it answers,
//! so a door cannot forget to; and once an ALLOW is to be written, nothing the client does (closing the
//! connection, a dropped handler) can cut the story before its end.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Map, Value};
use tracing::Instrument as _;

use super::authorize::{Ask, Granted, Refusal, Stop, authorize, input_refused};
use super::decision::Decision;
use super::execution::{count_execution, with_digest};
use super::steps::StepContext;
use super::{
    ActionResult, Moment, answer, commit, commit_allow, commit_outcome, count_result, executor_for,
    identify, principal_of, refuse, summarise, switched_off,
};
use crate::app::App;
use crate::audit::{EventType, PendingEvent};
use crate::domain::{ContextId, TraceId};
use crate::error::ApiError;
use crate::event::Fields;
use crate::executors::ChunkSink;
use crate::gates::auth::AuthenticatedKey;
use crate::gates::input::{self, InputRefusal};
use crate::policy::{Action, Policy};
use crate::reason::{Gate, ReasonCode};
use crate::telemetry;

/// The door a request came in by, recorded as `channel` in its REQUEST_START.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `POST /process`, the gateway's own envelope.
    Process,
    /// `POST /v1/chat/completions` and `GET /v1/models`.
    OpenAi,
    /// `/mcp`, the MCP server.
    Mcp,
    /// The operators' routes the console is built on (`/v1/audit/*`, `/v1/executors/*`).
    Console,
    /// `/v1/keys*`.
    Keys,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::OpenAi => "openai",
            Self::Mcp => "mcp",
            Self::Console => "console",
            Self::Keys => "keys",
        }
    }

    /// The channel of an operators' route.
    pub(super) fn of_operator_route(route: &str) -> Self {
        if route.starts_with("/v1/keys") {
            Self::Keys
        } else {
            Self::Console
        }
    }
}

/// A request at the turnstile, before any gate: who sent it from where, and through which door.
pub struct Door {
    pub trace_id: TraceId,
    pub headers: HeaderMap,
    pub client: IpAddr,
    pub channel: Channel,
    pub method: &'static str,
    pub route: &'static str,
}

impl Door {
    pub fn new(
        trace_id: TraceId,
        headers: HeaderMap,
        client: IpAddr,
        channel: Channel,
        method: &'static str,
        route: &'static str,
    ) -> Self {
        Self {
            trace_id,
            headers,
            client,
            channel,
            method,
            route,
        }
    }
}

/// G1 and G2: the caller's key, within its quota. A refusal is recorded and returned as the error.
#[tracing::instrument(skip_all, fields(trace_id = %door.trace_id, route = door.route))]
pub async fn admit(app: &Arc<App>, door: Door) -> Result<Admitted, ApiError> {
    let Door {
        trace_id,
        headers,
        client,
        channel,
        method,
        route,
    } = door;
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start = Fields::new()
        .str("channel", channel.as_str())
        .str("client_addr", &client.to_string())
        .opt_uint("content_length", content_length)
        .str("method", method)
        .str("route", route);
    let start = PendingEvent::from_fields(EventType::RequestStart, Some(&trace_id), start);
    let mut d = Decision::new(trace_id, start, app.policy());
    match identify(app, &mut d, &headers, client).await {
        Ok(key) => Ok(Admitted {
            app: app.clone(),
            d,
            key,
            headers,
            content_length,
            input_started: None,
        }),
        Err(Stop::Refused(refusal)) => Err(refuse(app, d, refusal).await),
        Err(Stop::Throttled(refusal)) => Err(summarise(app, d, client, route, refusal)),
        Err(Stop::Failed(e)) => Err(e),
    }
}

/// A request whose key passed G1 and G2; nothing about it is written yet.
pub struct Admitted {
    app: Arc<App>,
    d: Decision,
    key: AuthenticatedKey,
    headers: HeaderMap,
    content_length: Option<u64>,
    /// When G3 began (the body's first byte was awaited); G3's time runs from here.
    input_started: Option<Instant>,
}

impl Admitted {
    /// The policy that decides this request, from the moment it arrived.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.d.policy
    }

    /// G3's first half: a JSON body (by its `Content-Type`) within the body limit and timeout.
    pub async fn read_json_body(mut self, body: Body) -> Result<(Self, Bytes), ApiError> {
        self.input_started = Some(Instant::now());
        let read = match input::check_media_type(&self.headers) {
            Ok(()) => {
                input::read_body(body, self.content_length, self.app.config.body_limit_bytes).await
            }
            Err(refusal) => Err(refusal),
        };
        match read {
            Ok(bytes) => Ok((self, bytes)),
            Err(refusal) => Err(self.refuse_input(refusal).await),
        }
    }

    /// Records G3's refusal (with START and END) and returns the error to answer.
    pub async fn refuse_input(mut self, refusal: InputRefusal) -> ApiError {
        let started = self.input_started.unwrap_or_else(Instant::now);
        let stop = input_refused(
            &self.app.metrics,
            &mut self.d.verdicts,
            &mut self.d.facts,
            started,
            refusal,
        );
        match stop {
            Stop::Refused(refusal) | Stop::Throttled(refusal) => {
                refuse(&self.app, self.d, refusal).await
            }
            Stop::Failed(e) => e,
        }
    }

    /// The context a facade's request acts in: the one it `asked` for (the `X-Catraca-Context` header),
    /// else the key's only context (or the policy's only one, for a key valid in every context). A key
    /// with several and no choice made is refused with `CONTEXT_UNKNOWN`, naming them.
    pub fn context(&self, asked: Option<&str>) -> Result<String, InputRefusal> {
        if let Some(asked) = asked.map(str::trim).filter(|a| !a.is_empty()) {
            return Ok(asked.to_owned());
        }
        let candidates: Vec<&ContextId> = match &self.key.contexts {
            Some(contexts) => contexts.iter().collect(),
            None => self.d.policy.contexts().collect(),
        };
        match candidates.as_slice() {
            [only] => Ok(only.to_string()),
            _ => {
                let names: Vec<&str> = candidates.iter().map(|c| c.as_str()).collect();
                Err(InputRefusal::new(
                    ReasonCode::ContextUnknown,
                    format!(
                        "this key may act in several contexts ({}): name one in the X-Catraca-Context header",
                        names.join(", ")
                    ),
                ))
            }
        }
    }

    /// Adds `details` (small, never request content: e.g. the MCP method) to REQUEST_START, before
    /// anything of the story is written.
    pub fn add_details(&mut self, details: Map<String, Value>) {
        self.d.add_to_start(details);
    }

    /// What `/v1/models` and the MCP server's `tools/list` show: the actions with an executor, among
    /// those `wanted`, that this key may run in the context it `asked` for (else its only one), as the
    /// matrix decides for an empty payload (a rule's condition on the payload is decided when a call
    /// carries one). Recorded as a read (START, DECISION allow, END) before it is answered; a context
    /// the policy lacks is refused by G3, one the key may not use by G4 (`CONTEXT_FORBIDDEN`).
    pub async fn list(
        mut self,
        asked: Option<&str>,
        wanted: impl Fn(&Action) -> bool,
    ) -> Result<Vec<Arc<Action>>, ApiError> {
        let started = Instant::now();
        let policy = self.d.policy.clone();
        let context = match self.context(asked).and_then(|c| known_context(&policy, &c)) {
            Ok(context) => context,
            Err(refusal) => return Err(self.refuse_input(refusal).await),
        };
        self.d.facts.context = Some(context.to_string());
        self.d
            .verdicts
            .record(&self.app.metrics, Gate::Input, started, None);
        let started = Instant::now();
        if self
            .key
            .contexts
            .as_ref()
            .is_some_and(|contexts| !contexts.contains(&context))
        {
            let refusal = Refusal::new(
                Gate::ActionMatrix,
                ReasonCode::ContextForbidden,
                format!("this key may not act in context {context}"),
                None,
            );
            self.d.verdicts.record(
                &self.app.metrics,
                Gate::ActionMatrix,
                started,
                Some(&refusal.codes),
            );
            return Err(refuse(&self.app, self.d, refusal).await);
        }
        let principal = principal_of(&self.key);
        let empty = Value::Object(Map::new());
        let listed: Vec<Arc<Action>> = policy
            .actions()
            .filter(|a| a.executor.is_some() && wanted(a))
            .filter(|a| {
                policy
                    .evaluate(&principal, &context, &a.name, &empty)
                    .allowed
            })
            .cloned()
            .collect();
        self.d
            .verdicts
            .record(&self.app.metrics, Gate::ActionMatrix, started, None);
        let events = vec![
            self.d.start_event(),
            self.d.event("allow", Gate::ActionMatrix, &[]),
            self.d.end_event(StatusCode::OK, "SUCCESS"),
        ];
        commit(&self.app, &self.d, events, Moment::Read).await?;
        Ok(listed)
    }

    /// The policy's half of G3 and G4 for `action` in `context` with `payload`, then the kill switch.
    /// A refusal is recorded; an allowed request is written only once it is [`Allowed::start`]ed.
    pub async fn authorize(
        mut self,
        action: &str,
        context: &str,
        payload: Value,
    ) -> Result<Allowed, ApiError> {
        let started = self.input_started.unwrap_or_else(Instant::now);
        let policy = self.d.policy.clone();
        let principal = principal_of(&self.key);
        let ask = Ask::Run {
            action,
            context,
            payload,
            started,
        };
        let trace_id = self.d.trace_id.clone();
        let granted = match authorize(
            &self.app.metrics,
            &policy,
            &trace_id,
            &principal,
            ask,
            &mut self.d.verdicts,
            &mut self.d.facts,
        ) {
            Ok(granted) => granted,
            Err(Stop::Refused(refusal) | Stop::Throttled(refusal)) => {
                return Err(refuse(&self.app, self.d, refusal).await);
            }
            Err(Stop::Failed(e)) => return Err(e),
        };
        let app = self.app.clone();
        let executor = executor_for(&app, &self.d, &granted)?;
        if let Some(refusal) = switched_off(&app, &self.d, executor).await? {
            return Err(refuse(&app, self.d, refusal).await);
        }
        Ok(Allowed {
            app: self.app,
            d: self.d,
            key: self.key,
            granted,
        })
    }
}

/// An allowed request, not yet written: [`Allowed::start`] runs its story.
pub struct Allowed {
    app: Arc<App>,
    d: Decision,
    key: AuthenticatedKey,
    granted: Granted,
}

impl Allowed {
    /// Starts the story in a task of its own (START, ALLOW and EXECUTOR_SELECTED durable, the executor,
    /// ACTION_EXECUTED and REQUEST_END durable), relaying the executor's chunks to `stream` when given
    /// and the executor streams. The story runs to its end whether or not anyone awaits it.
    pub fn start(self, stream: Option<ChunkSink>) -> Running {
        let trace_id = self.d.trace_id.clone();
        // Boxed where it is made: the task's cell, its completion and the join each move the future
        // (several kilobytes of state) otherwise.
        let story = telemetry::within(
            telemetry::current(),
            Box::pin(self.run(stream)).in_current_span(),
        );
        Running {
            task: tokio::spawn(story),
            trace_id,
        }
    }

    /// [`Allowed::start`], awaited: the result or the failure, with the outcome durable.
    pub async fn execute(self, stream: Option<ChunkSink>) -> Result<ActionResult, ApiError> {
        self.start(stream).await
    }

    async fn run(mut self, stream: Option<ChunkSink>) -> Result<ActionResult, ApiError> {
        let app = self.app.clone();
        let executor = executor_for(&app, &self.d, &self.granted)?;
        let receipt = commit_allow(&app, &self.d, &self.granted, executor).await?;
        let started = Instant::now();
        // The payload goes to the executor; the trail already holds its digest.
        let payload = std::mem::take(&mut self.granted.payload);
        let mut call = StepContext::root(
            &self.app,
            &self.d,
            principal_of(&self.key),
            &self.granted.context,
        )
        .call(&self.granted.action.name, payload);
        call.stream = stream.clone();
        let outcome = executor.run(call).await.and_then(with_digest);
        let elapsed = started.elapsed();
        let status = count_execution(&app, &executor.name, &outcome, elapsed);
        let streamed = stream.is_some_and(|s| s.sent() > 0);
        commit_outcome(
            &app,
            &self.d,
            &self.granted,
            executor,
            &outcome,
            status,
            elapsed,
            streamed,
        )
        .await?;
        count_result(&app, self.d.action_label(), status);
        answer(self.d, &self.granted, executor, outcome, elapsed, receipt)
    }
}

/// A started story: resolves to its result once its outcome is durable.
pub struct Running {
    task: tokio::task::JoinHandle<Result<ActionResult, ApiError>>,
    trace_id: TraceId,
}

impl Future for Running {
    type Output = Result<ActionResult, ApiError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.task).poll(cx).map(|joined| {
            joined.unwrap_or_else(|e| {
                Err(ApiError::internal(
                    format!("the request's story stopped unexpectedly: {e}"),
                    Some(&self.trace_id),
                ))
            })
        })
    }
}

/// `context` when the policy defines it, else G3's refusal.
fn known_context(policy: &Policy, context: &str) -> Result<ContextId, InputRefusal> {
    ContextId::parse(context)
        .ok()
        .filter(|c| policy.has_context(c.as_str()))
        .ok_or_else(|| {
            InputRefusal::new(
                ReasonCode::ContextUnknown,
                format!(
                    "unknown context {:?}",
                    context.chars().take(64).collect::<String>()
                ),
            )
        })
}
