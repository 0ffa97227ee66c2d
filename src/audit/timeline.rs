//! `catraca audit trace`: one request's events as a readable timeline.

use std::fmt::Write as _;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::event::SealedEvent;

fn offset_ms(first: &str, at: &str) -> f64 {
    match (
        OffsetDateTime::parse(first, &Rfc3339),
        OffsetDateTime::parse(at, &Rfc3339),
    ) {
        (Ok(a), Ok(b)) => (b - a).as_seconds_f64() * 1000.0,
        _ => 0.0,
    }
}

fn list(v: &Value) -> String {
    match v.as_array() {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".to_owned(),
    }
}

fn us(v: &Value) -> String {
    v.as_u64().map_or_else(
        || "?".to_owned(),
        |n| format!("{:.3} ms", n as f64 / 1000.0),
    )
}

/// Renders the events (in chain order) of one trace.
pub fn render(trace_id: &str, events: &[SealedEvent]) -> String {
    let mut out = String::new();
    let Some(first) = events.first() else {
        return format!("no audit events for trace {trace_id}\n");
    };
    let _ = writeln!(
        out,
        "trace {trace_id}  (chain {}, started {})",
        first.chain_id, first.occurred_at
    );
    for e in events {
        let body = e.to_json();
        let _ = write!(
            out,
            "  +{:>9.3} ms  #{:<6} {:<18}",
            offset_ms(&first.occurred_at, &e.occurred_at),
            e.seq,
            e.event_type
        );
        match e.event_type.as_str() {
            "REQUEST_START" => {
                let _ = write!(
                    out,
                    "{} {} from {}",
                    body["method"].as_str().unwrap_or("?"),
                    body["route"].as_str().unwrap_or("?"),
                    body["client_addr"].as_str().unwrap_or("?")
                );
                // Events written before channels were recorded have none.
                if let Some(channel) = body["channel"].as_str() {
                    let _ = write!(out, "  channel {channel}");
                }
                for (name, label) in [("mcp_method", "mcp"), ("tool", "tool")] {
                    if let Some(value) = body[name].as_str() {
                        let _ = write!(out, "  {label} {value}");
                    }
                }
                let _ = writeln!(out);
            }
            "DECISION" => {
                let principal = &body["principal"];
                let _ = writeln!(
                    out,
                    "{} by {}  action {}  context {}  key {} ({})",
                    body["effect"].as_str().unwrap_or("?").to_uppercase(),
                    body["gate"].as_str().unwrap_or("?"),
                    body["action"]
                        .as_str()
                        .or(body["requested_action"].as_str())
                        .unwrap_or("-"),
                    body["context_id"].as_str().unwrap_or("-"),
                    principal["key_id"]
                        .as_str()
                        .or(body["presented_key_id"].as_str())
                        .unwrap_or("-"),
                    principal["role"].as_str().unwrap_or("unauthenticated"),
                );
                let _ = writeln!(
                    out,
                    "{:32}reasons: {}  rules: {}",
                    "",
                    list(&body["reason_codes"]),
                    list(&body["determining_rules"])
                );
                let _ = writeln!(
                    out,
                    "{:32}policy revision {}",
                    "",
                    body["policy_revision"].as_str().unwrap_or("?")
                );
                for g in body["gates"].as_array().into_iter().flatten() {
                    let _ = writeln!(
                        out,
                        "{:32}gate {:<14} {:<5} {:>10}  {}",
                        "",
                        g["gate"].as_str().unwrap_or("?"),
                        g["verdict"].as_str().unwrap_or("?"),
                        us(&g["duration_us"]),
                        list(&g["reason_codes"])
                    );
                }
                if let Some(p) = body["payload"].as_object() {
                    let _ = writeln!(
                        out,
                        "{:32}payload {} bytes, sha256 {}",
                        "",
                        p.get("size_bytes")
                            .map_or_else(String::new, ToString::to_string),
                        p.get("sha256").and_then(Value::as_str).unwrap_or("?")
                    );
                }
            }
            "EXECUTOR_SELECTED" => {
                let _ = writeln!(
                    out,
                    "executor {} (kind {}, timeout {} ms)",
                    body["executor_id"].as_str().unwrap_or("?"),
                    body["executor_kind"].as_str().unwrap_or("?"),
                    body["timeout_ms"]
                );
            }
            "STEP_EXECUTED" => {
                let _ = writeln!(
                    out,
                    "step {} {} ({}) {} in {}{}{}",
                    body["step"],
                    body["action"].as_str().unwrap_or("?"),
                    body["executor_id"].as_str().unwrap_or("-"),
                    body["status"].as_str().unwrap_or("?"),
                    us(&body["duration_us"]),
                    match list(&body["reason_codes"]).as_str() {
                        "-" => String::new(),
                        codes => format!("  reasons: {codes}"),
                    },
                    body["error"]
                        .as_str()
                        .map_or_else(String::new, |e| format!("  error: {e}"))
                );
            }
            "ACTION_EXECUTED" => {
                let _ = writeln!(
                    out,
                    "{} {} in {}{}",
                    body["executor_id"].as_str().unwrap_or("?"),
                    body["status"].as_str().unwrap_or("?"),
                    us(&body["duration_us"]),
                    body["error"]
                        .as_str()
                        .map_or_else(String::new, |e| format!("  error: {e}"))
                );
            }
            "REQUEST_END" => {
                let _ = writeln!(
                    out,
                    "HTTP {} {} after {}",
                    body["status"],
                    body["outcome"].as_str().unwrap_or("?"),
                    us(&body["duration_us"])
                );
            }
            _ => {
                let _ = writeln!(out);
            }
        }
    }
    out
}
