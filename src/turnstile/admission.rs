//! The turnstile in steps, for every door a request comes in by (`/process`, the OpenAI facade, the
//! MCP server): [`admit`] runs G1 and G2, [`Admitted`] reads the body and names what is asked (G3),
//! [`Admitted::authorize`] runs the policy's half of G3 and G4 and makes the ALLOW durable, and
//! [`Allowed::execute`] runs the executor and makes its outcome durable. Each step that refuses records
//! the refusal (REQUEST_START, DECISION deny, REQUEST_END) before it answers, so a door cannot forget to.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use super::authorize::{Ask, Granted, Stop, authorize, input_refused};
use super::decision::Decision;
use super::execution::{count_execution, with_digest};
use super::steps::StepContext;
use super::{
    ActionResult, Moment, answer, authenticate, commit, commit_allow, commit_outcome, count_result,
    executor_for, identify, principal_of, refuse, summarise, switched_off,
};
use crate::app::App;
use crate::audit::{EventType, PendingEvent};
use crate::domain::{ContextId, TraceId};
use crate::error::ApiError;
use crate::executors::ChunkSink;
use crate::gates::auth::AuthenticatedKey;
use crate::gates::input::{self, InputRefusal};
use crate::policy::{Action, Policy};
use crate::reason::{Gate, ReasonCode};

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
    /// Facts the door adds to REQUEST_START (e.g. the MCP method and request id); small, never
    /// request content.
    pub details: serde_json::Map<String, Value>,
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
            details: serde_json::Map::new(),
        }
    }

    /// Adds `name` to the REQUEST_START event.
    #[must_use]
    pub fn with_detail(mut self, name: &str, value: Value) -> Self {
        self.details.insert(name.to_owned(), value);
        self
    }
}

/// G1 alone, for a door's own traffic that is not a request for anything (the MCP handshake): the
/// key is checked, a refusal recorded like any other, and nothing written for a key that passes, which
/// is not counted against its quota either (the requests that follow are).
pub async fn recognize(app: &Arc<App>, door: Door) -> Result<AuthenticatedKey, ApiError> {
    let client = door.client;
    let route = door.route;
    let (mut d, headers, _) = start(app, door);
    match authenticate(app, &mut d, &headers, client).await {
        Ok(key) => Ok(key),
        Err(Stop::Refused(refusal)) => Err(refuse(app, d, refusal).await),
        Err(Stop::Throttled(refusal)) => Err(summarise(app, d, client, route, refusal)),
        Err(Stop::Failed(e)) => Err(e),
    }
}

/// G1 and G2: the caller's key, within its quota. A refusal is recorded and returned as the error.
#[tracing::instrument(skip_all, fields(trace_id = %door.trace_id, route = door.route))]
pub async fn admit(app: &Arc<App>, door: Door) -> Result<Admitted, ApiError> {
    let client = door.client;
    let route = door.route;
    let (mut d, headers, content_length) = start(app, door);
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

/// The story of a request at the door: its REQUEST_START (not yet written) under the policy in force.
fn start(app: &App, door: Door) -> (Decision, HeaderMap, Option<u64>) {
    let Door {
        trace_id,
        headers,
        client,
        channel,
        method,
        route,
        details,
    } = door;
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut start = json!({
        "method": method,
        "route": route,
        "channel": channel.as_str(),
        "client_addr": client.to_string(),
        "content_length": content_length,
    });
    if let Value::Object(fields) = &mut start {
        fields.extend(details);
    }
    let start = PendingEvent::new(EventType::RequestStart, Some(&trace_id), start);
    let d = Decision::new(trace_id, start, app.policy());
    (d, headers, content_length)
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
    pub fn key(&self) -> &AuthenticatedKey {
        &self.key
    }

    pub fn trace_id(&self) -> &TraceId {
        &self.d.trace_id
    }

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

    /// The actions with an executor this key may run in `context`, as the matrix decides for an empty
    /// payload (a rule condition on the payload is decided when a call carries one), filtered by
    /// `wanted`. What `/v1/models` and the MCP server's `tools/list` show.
    pub fn runnable(
        &self,
        context: &str,
        wanted: impl Fn(&Action) -> bool,
    ) -> Result<Vec<Arc<Action>>, InputRefusal> {
        let policy = &self.d.policy;
        let context = ContextId::parse(context)
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
            })?;
        let principal = principal_of(&self.key);
        let empty = Value::Object(serde_json::Map::new());
        Ok(policy
            .actions()
            .filter(|a| a.executor.is_some() && wanted(a))
            .filter(|a| {
                policy
                    .evaluate(&principal, &context, &a.name, &empty)
                    .allowed
            })
            .cloned()
            .collect())
    }

    /// Records a listing (what this key may run, in `context`) as an allowed read: START, DECISION
    /// allow and END, durable before the list is answered.
    pub async fn record_listing(mut self, context: &str) -> Result<AuthenticatedKey, ApiError> {
        self.d.facts.context = Some(context.to_owned());
        self.d
            .verdicts
            .record(&self.app.metrics, Gate::ActionMatrix, Instant::now(), None);
        let events = vec![
            self.d.start_event(),
            self.d.event("allow", Gate::ActionMatrix, &[]),
            self.d.end_event(StatusCode::OK, "SUCCESS"),
        ];
        commit(&self.app, &self.d, events, Moment::Read).await?;
        Ok(self.key)
    }

    /// The policy's half of G3 and G4 for `action` in `context` with `payload`, then the kill switch;
    /// an allowed request's START, ALLOW and EXECUTOR_SELECTED are durable when this returns.
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
        commit_allow(&app, &self.d, &granted, executor).await?;
        Ok(Allowed {
            app: self.app,
            d: self.d,
            key: self.key,
            granted,
        })
    }
}

/// An allowed request whose ALLOW is durable; its executor has not run yet.
pub struct Allowed {
    app: Arc<App>,
    d: Decision,
    key: AuthenticatedKey,
    granted: Granted,
}

impl Allowed {
    pub fn trace_id(&self) -> &TraceId {
        &self.d.trace_id
    }

    pub fn action(&self) -> &str {
        self.granted.action.name.as_str()
    }

    /// Runs the executor (relaying its chunks to `stream`, when given and the executor streams) and
    /// makes ACTION_EXECUTED and REQUEST_END durable before returning the result or the failure.
    pub async fn execute(mut self, stream: Option<ChunkSink>) -> Result<ActionResult, ApiError> {
        let app = self.app.clone();
        let executor = executor_for(&app, &self.d, &self.granted)?;
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
        answer(self.d, &self.granted, executor, outcome, elapsed)
    }
}
