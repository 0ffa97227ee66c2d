//! The answer to a connection over the cap: a complete 503 `TOO_MANY_CONNECTIONS` with the documented
//! error body, written straight to the socket (no HTTP machinery, no request read), then the close.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::domain::TraceId;
use crate::error::ErrorBody;
use crate::reason::ReasonCode;

/// The answer is a few hundred bytes, which any socket buffer takes at once; a client that cannot
/// take them within a second is not worth a descriptor.
const WRITE_LIMIT: Duration = Duration::from_secs(1);

/// After the answer, what the client sent is read and dropped for this long (or until it closes):
/// closing a socket with unread bytes resets it, and a reset can destroy the answer before the
/// client has read it.
const LINGER: Duration = Duration::from_millis(500);

/// When a client may try again: connections close within the timeouts, often much sooner.
const RETRY_AFTER_SECS: u64 = 1;

/// Writes the 503 answer to `stream` and closes it; `_permit` bounds the refusals written at once.
pub(super) async fn too_many_connections(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let written = tokio::time::timeout(WRITE_LIMIT, stream.write_all(&answer())).await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0_u8; 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The whole HTTP/1.1 response: status line, headers and the JSON error body.
fn answer() -> Vec<u8> {
    let reason = ReasonCode::TooManyConnections;
    let trace_id = TraceId::generate();
    let body = ErrorBody {
        error: "TOO_MANY_CONNECTIONS",
        gate: None,
        reason_codes: vec![reason.clone()],
        message: "the gateway has as many connections open as it is configured to allow; \
                  retry shortly"
            .to_owned(),
        trace_id: Some(trace_id.to_string()),
        decision_id: None,
        violations: vec![],
        action: None,
        executor_id: None,
        receipt: None,
    };
    let json = serde_json::to_vec(&body).unwrap_or_else(|e| {
        // Strings and a list of strings always serialize; this is only for the type's sake.
        tracing::error!(error = %e, "cannot serialize the connection refusal");
        Vec::new()
    });
    let status = reason.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: {RETRY_AFTER_SECS}\r\nx-trace-id: {trace_id}\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        json.len(),
    )
    .into_bytes();
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_a_complete_503_with_the_documented_body() {
        let text = String::from_utf8(answer()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains("\r\ncontent-type: application/json"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "TOO_MANY_CONNECTIONS");
        assert_eq!(
            json["reason_codes"],
            serde_json::json!(["TOO_MANY_CONNECTIONS"])
        );
        let trace = json["trace_id"].as_str().unwrap();
        assert!(head.contains(&format!("\r\nx-trace-id: {trace}")));
    }
}
