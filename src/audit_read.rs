//! Reading the trail back, for callers the policy allows `audit.read` (every read is itself audited):
//! one request's events (`GET /v1/audit/traces/{trace_id}`), recent decisions page by page
//! (`GET /v1/audit/decisions`) and the chains with the last verification (`GET /v1/audit/chains`).

use std::net::IpAddr;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::audit::timeline;
use crate::domain::TraceId;
use crate::error::ApiError;
use crate::event::{SealedEvent, micros_of, timestamp_of_micros};
use crate::reason::{Gate, ReasonCode};
use crate::turnstile::authorize_permission;

/// The permission the policy must grant to read the trail.
pub const AUDIT_READ: &str = "audit.read";

/// Events of `wanted`, in chain order, for a caller allowed `audit.read`.
pub async fn trace_events(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
    wanted: &str,
) -> Result<Value, ApiError> {
    authorize_permission(
        app,
        trace_id,
        headers,
        client,
        "/v1/audit/traces/{trace_id}",
        AUDIT_READ,
    )
    .await?;
    let events = app
        .store
        .events_for_trace(wanted)
        .await
        .map_err(|e| ApiError::internal(e, Some(trace_id)))?;
    if events.is_empty() {
        return Err(ApiError::NotFound {
            message: "no audit events for this trace id".to_owned(),
            trace_id: Some(trace_id.clone()),
        });
    }
    Ok(json!({
        "trace_id": wanted,
        "timeline": timeline::render(wanted, &events),
        "events": events.iter().map(SealedEvent::to_json).collect::<Vec<_>>(),
    }))
}

/// Most events one page of decisions examines: a rare filter answers with fewer rows (or none) and a
/// cursor to go on from, instead of reading the whole trail in one request.
const SCAN_BUDGET: usize = 20_000;
/// Events read from the store at a time while looking for decisions.
const SCAN_PAGE: usize = 1_000;
/// Largest page of decisions.
const MAX_DECISIONS: usize = 100;

/// Filters of `GET /v1/audit/decisions`; each one given must match.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DecisionQuery {
    /// `allow` or `deny`.
    #[param(pattern = "^(allow|deny)?$")]
    pub effect: Option<String>,
    /// The gate that decided: `auth`, `rate_limit`, `input` or `action_matrix`.
    #[param(pattern = "^(auth|rate_limit|input|action_matrix)?$")]
    pub gate: Option<String>,
    /// A reason code among the decision's.
    pub reason: Option<String>,
    /// The action asked for.
    pub action: Option<String>,
    /// The key that asked (or was presented, when it was refused).
    pub key_id: Option<String>,
    /// The `next` of the previous page.
    #[param(
        pattern = "^([0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\\.[0-9]{6}Z,[^,]+,-?[0-9]{1,18})?$"
    )]
    pub before: Option<String>,
    /// Decisions per page, 1 to 100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<usize>,
}

/// One decision as the console lists it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionRow {
    pub trace_id: Option<String>,
    pub occurred_at: String,
    pub effect: Option<String>,
    pub gate: Option<String>,
    pub reason_codes: Vec<String>,
    pub action: Option<String>,
    pub context_id: Option<String>,
    pub key_id: Option<String>,
    pub role: Option<String>,
    pub policy_revision: Option<String>,
    pub determining_rules: Vec<String>,
    pub chain_id: String,
    pub seq: i64,
}

/// A page of decisions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionPage {
    pub decisions: Vec<DecisionRow>,
    /// Where the next (older) page starts; `null` once the whole trail has been read.
    pub next: Option<String>,
    /// Events examined for this page.
    pub scanned: usize,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

impl DecisionRow {
    /// The row of a DECISION event; `None` for any other event.
    fn of(event: &SealedEvent) -> Option<Self> {
        if event.event_type != "DECISION" {
            return None;
        }
        let body = event.to_json();
        let text = |v: &Value| v.as_str().map(str::to_owned);
        Some(Self {
            trace_id: event.trace_id.clone(),
            occurred_at: event.occurred_at.clone(),
            effect: text(&body["effect"]),
            gate: text(&body["gate"]),
            reason_codes: strings(&body["reason_codes"]),
            action: text(&body["action"]).or_else(|| text(&body["requested_action"])),
            context_id: text(&body["context_id"]),
            key_id: text(&body["principal"]["key_id"]).or_else(|| text(&body["presented_key_id"])),
            role: text(&body["principal"]["role"]),
            policy_revision: text(&body["policy_revision"]),
            determining_rules: strings(&body["determining_rules"]),
            chain_id: event.chain_id.clone(),
            seq: event.seq,
        })
    }

    fn matches(&self, q: &DecisionQuery) -> bool {
        let is = |want: &Option<String>, have: &Option<String>| {
            want.as_deref().is_none_or(|w| have.as_deref() == Some(w))
        };
        is(&q.effect, &self.effect)
            && is(&q.gate, &self.gate)
            && is(&q.action, &self.action)
            && is(&q.key_id, &self.key_id)
            && q.reason
                .as_deref()
                .is_none_or(|r| self.reason_codes.iter().any(|c| c == r))
    }
}

/// A position in the trail's time order, as the `before` cursor carries it: `occurred_at,chain_id,seq`.
fn cursor_of(event: &SealedEvent) -> String {
    format!("{},{},{}", event.occurred_at, event.chain_id, event.seq)
}

/// A cursor's position, its time in the trail's form. A time the calendar lacks but the form allows (a
/// hand-made `2026-02-30T…`) stands for the first moment of the next month: no event's time sorts
/// between the two.
fn parse_cursor(cursor: &str) -> Option<(String, String, i64)> {
    let mut parts = cursor.splitn(3, ',');
    let (at, chain, seq) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
    if chain.is_empty() {
        return None;
    }
    if let Some(at) = micros_of(at).and_then(timestamp_of_micros) {
        return Some((at, chain.to_owned(), seq));
    }
    let next_month = first_of_next_month(at)?;
    Some((next_month, String::new(), i64::MIN))
}

/// The first moment of the month after the one `at` names, when `at` has the trail's form with a day
/// of the month up to 31 (whether or not the month has it).
fn first_of_next_month(at: &str) -> Option<String> {
    let digits = |from: usize, to: usize| {
        at.get(from..to)
            .filter(|d| d.bytes().all(|c| c.is_ascii_digit()))?
            .parse::<u16>()
            .ok()
    };
    let b = at.as_bytes();
    let shape = b.len() == 27
        && [(4, b'-'), (7, b'-'), (10, b'T')]
            .iter()
            .all(|&(i, c)| b[i] == c);
    if !shape || !(1..=31).contains(&digits(8, 10)?) {
        return None;
    }
    let month = time::Month::try_from(u8::try_from(digits(5, 7)?).ok()?).ok()?;
    let year = i32::from(digits(0, 4)?) + i32::from(month == time::Month::December);
    let first = time::Date::from_calendar_date(year, month.next(), 1).ok()?;
    timestamp_of_micros(first.midnight().assume_utc().unix_timestamp() * 1_000_000)
}

/// Recent decisions matching `q`, newest first, for a caller allowed `audit.read`. A page examines at
/// most [`SCAN_BUDGET`] events; `next` goes on from where it stopped.
pub async fn decisions(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
    q: &DecisionQuery,
) -> Result<DecisionPage, ApiError> {
    let rejected = |message: String| ApiError::Rejected {
        reason: ReasonCode::MalformedRequest,
        message,
        trace_id: Some(trace_id.clone()),
    };
    // An empty parameter is no filter (a form sends its blank fields).
    let blank = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let q = &DecisionQuery {
        effect: blank(&q.effect),
        gate: blank(&q.gate),
        reason: blank(&q.reason),
        action: blank(&q.action),
        key_id: blank(&q.key_id),
        before: blank(&q.before),
        limit: q.limit,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_DECISIONS).contains(&limit) {
        return Err(rejected(format!("limit must be 1 to {MAX_DECISIONS}")));
    }
    if q.effect
        .as_deref()
        .is_some_and(|e| e != "allow" && e != "deny")
    {
        return Err(rejected("effect must be allow or deny".to_owned()));
    }
    if let Some(gate) = q.gate.as_deref()
        && !Gate::ALL.iter().any(|g| g.as_str() == gate)
    {
        return Err(rejected(
            "gate must be auth, rate_limit, input or action_matrix".to_owned(),
        ));
    }
    let mut from: Option<(String, String, i64)> = match q.before.as_deref() {
        None => None,
        Some(c) => Some(
            parse_cursor(c)
                .ok_or_else(|| rejected("before must be the `next` of a previous page".into()))?,
        ),
    };
    authorize_permission(
        app,
        trace_id,
        headers,
        client,
        "/v1/audit/decisions",
        AUDIT_READ,
    )
    .await?;
    let mut page = DecisionPage {
        decisions: Vec::new(),
        next: None,
        scanned: 0,
    };
    loop {
        let want = SCAN_PAGE.min(SCAN_BUDGET - page.scanned);
        let position = from
            .as_ref()
            .map(|(at, chain, seq)| (at.as_str(), chain.as_str(), *seq));
        let events = app
            .store
            .events_before(position, i64::try_from(want).unwrap_or(i64::MAX))
            .await
            .map_err(|e| ApiError::internal(e, Some(trace_id)))?;
        for event in &events {
            page.scanned += 1;
            if let Some(row) = DecisionRow::of(event).filter(|r| r.matches(q)) {
                page.decisions.push(row);
                if page.decisions.len() == limit {
                    page.next = Some(cursor_of(event));
                    return Ok(page);
                }
            }
        }
        let Some(last) = events.last() else {
            return Ok(page);
        };
        if events.len() < want {
            return Ok(page); // the oldest event has been read
        }
        if page.scanned >= SCAN_BUDGET {
            page.next = Some(cursor_of(last));
            return Ok(page);
        }
        from = Some((last.occurred_at.clone(), last.chain_id.clone(), last.seq));
    }
}

/// One chain of the trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainRow {
    pub chain_id: String,
    /// Events in the chain (its last position).
    pub events: i64,
    pub first_at: String,
}

/// What the last `catraca audit verify` of the store found.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerificationRow {
    pub verified_at: String,
    pub ok: bool,
    pub chains: i64,
    pub events: i64,
    pub duration_ms: i64,
    /// The first problem found; empty when intact.
    pub failures: Vec<String>,
    /// Who ran it (`cli`).
    pub source: String,
}

/// The chains, oldest first, and the last verification.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainsState {
    pub chains: Vec<ChainRow>,
    /// `null` until the store has been verified once.
    pub last_verification: Option<VerificationRow>,
}

/// The chains' state, for a caller allowed `audit.read`.
pub async fn chains(
    app: &App,
    trace_id: &TraceId,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<ChainsState, ApiError> {
    authorize_permission(
        app,
        trace_id,
        headers,
        client,
        "/v1/audit/chains",
        AUDIT_READ,
    )
    .await?;
    let failed = |e| ApiError::internal(e, Some(trace_id));
    let (chains, last) =
        tokio::try_join!(app.store.chains(), app.store.last_verification()).map_err(failed)?;
    Ok(ChainsState {
        chains: chains
            .into_iter()
            .map(|c| ChainRow {
                chain_id: c.chain_id,
                events: c.events,
                first_at: c.first_at,
            })
            .collect(),
        last_verification: last.map(|v| VerificationRow {
            verified_at: v.verified_at,
            ok: v.ok,
            chains: v.chains,
            events: v.events,
            duration_ms: v.duration_ms,
            failures: v.finding.into_iter().collect(),
            source: v.source,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_cursor;

    #[test]
    fn a_cursor_is_read_in_the_trails_form() {
        let at = "2026-12-06T10:59:26.233186Z";
        assert_eq!(
            parse_cursor(&format!("{at},gw-1,42")),
            Some((at.to_owned(), "gw-1".to_owned(), 42))
        );
        // Another RFC 3339 form of a moment is read as the trail writes it.
        assert_eq!(
            parse_cursor("2026-12-06T11:59:26.233186+01:00,gw-1,42").map(|c| c.0),
            Some(at.to_owned())
        );
    }

    #[test]
    fn a_day_the_month_lacks_stands_for_the_start_of_the_next_month() {
        assert_eq!(
            parse_cursor("2026-02-30T05:00:00.000000Z,gw-1,7"),
            Some((
                "2026-03-01T00:00:00.000000Z".to_owned(),
                String::new(),
                i64::MIN
            ))
        );
        assert_eq!(
            parse_cursor("2026-04-31T23:59:59.999999Z,gw-1,7").map(|c| c.0),
            Some("2026-05-01T00:00:00.000000Z".to_owned())
        );
    }

    #[test]
    fn what_is_no_position_is_refused() {
        for bad in [
            "yesterday,gw-1,1",
            "2026-12-06T10:59:26.233186Z,,1",
            "2026-12-06T10:59:26.233186Z,gw-1,one",
            "2026-13-01T00:00:00.000000Z,gw-1,1",
            "2026-02-32T00:00:00.000000Z,gw-1,1",
            "+026-02-30T00:00:00.000000Z,gw-1,1",
            "2026-12-06T10:59:26.233186Z",
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad}");
        }
    }
}
