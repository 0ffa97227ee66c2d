//! G0: the trace id. From a well-formed W3C `traceparent`, else a well-formed `X-Trace-Id`, else new.

use axum::http::HeaderMap;

use crate::domain::TraceId;

pub const TRACEPARENT: &str = "traceparent";
pub const X_TRACE_ID: &str = "x-trace-id";

/// The request's trace id; malformed client values are ignored, never echoed.
pub fn trace_id_of(headers: &HeaderMap) -> TraceId {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header(TRACEPARENT)
        .and_then(|v| TraceId::from_traceparent(v).ok())
        .or_else(|| header(X_TRACE_ID).and_then(|v| TraceId::parse(v.trim()).ok()))
        .unwrap_or_else(TraceId::generate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_wins_then_x_trace_id_then_a_new_one() {
        let mut h = HeaderMap::new();
        h.insert(X_TRACE_ID, "client-trace-0001".parse().unwrap());
        assert_eq!(trace_id_of(&h).as_str(), "client-trace-0001");
        h.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id_of(&h).as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut bad = HeaderMap::new();
        bad.insert(X_TRACE_ID, "bad id with spaces".parse().unwrap());
        let generated = trace_id_of(&bad);
        assert_ne!(generated.as_str(), "bad id with spaces");
        assert_eq!(generated.as_str().len(), 32);
    }
}
