//! The process log: JSON lines that carry the request's trace id, and no colour codes in a file.

use serde_json::Value;

use crate::binary::{Cli, Serve};
use crate::helpers::echo;

/// A gateway whose every `/process` request logs an error while it is served: the shared rate limiter
/// is a port where nothing listens.
fn failing_limiter(dir: &std::path::Path, format: &str) -> (Cli, String) {
    let db = format!("sqlite://{}", dir.join("catraca.db").display());
    let cli = Cli::on(&db, dir, "logs")
        .env("CATRACA_MODE", "staging")
        .env("CATRACA_LOG", "info")
        .env("CATRACA_LOG_FORMAT", format)
        .env("CATRACA_REDIS_URL", "redis://127.0.0.1:1");
    let created = cli.stdout(&[
        "keys", "create", "--name", "logs", "--role", "admin", "--json",
    ]);
    let key: Value = serde_json::from_str(&created).unwrap();
    (cli, key["key"].as_str().unwrap().to_owned())
}

/// Sends a `/process` request under `trace` (refused 503: the limiter is down) and waits for its log line.
async fn send_logging_request(serve: &Serve, key: &str, trace: &str) {
    let resp = reqwest::Client::new()
        .post(serve.url("/process"))
        .header("x-api-key", key)
        .header("x-trace-id", trace)
        .json(&echo("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    serve.wait_for_stderr("the limiter's failure", |e| {
        e.contains("rate limiter unavailable")
    });
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_lines_of_a_request_carry_its_trace_id() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (cli, key) = failing_limiter(dir.path(), "json");
    let serve = Serve::start(&cli);

    // Act: a request whose handling logs the limiter's failure.
    send_logging_request(&serve, &key, "logs-trace-0001").await;
    let (_, stderr) = serve.stop();

    // Assert: every line is a JSON object; the request's lines name its trace id.
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(Value::is_object), "{stderr}");
    let failure = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("rate limiter unavailable"))
        })
        .unwrap_or_else(|| panic!("no line about the limiter:\n{stderr}"));
    assert_eq!(failure["span"]["trace_id"], "logs-trace-0001", "{failure}");
    assert_eq!(failure["level"], "ERROR", "{failure}");
}

#[tokio::test]
async fn text_logs_written_to_a_pipe_have_no_colour_codes() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (cli, key) = failing_limiter(dir.path(), "text");
    let serve = Serve::start(&cli);

    // Act
    send_logging_request(&serve, &key, "logs-trace-0002").await;

    // Assert: stderr is a pipe here, so not one escape sequence; the trace id is on the line.
    let raw = serve.raw_stderr();
    assert!(!raw.contains('\u{1b}'), "{raw:?}");
    let line = raw
        .lines()
        .find(|l| l.contains("rate limiter unavailable"))
        .unwrap();
    assert!(line.contains("trace_id=logs-trace-0002"), "{line}");
    serve.stop();
}

// Multi-threaded: the request is sent by a task while this thread waits for the log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executors_log_lines_carry_the_trace_id_of_the_request_it_serves() {
    // Arrange: a collector whose upstream refuses connections, so its first page logs a retry from
    // inside the executor's own task.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("catraca.db").display());
    let cli = Cli::on(&db, dir.path(), "logs")
        .env("CATRACA_MODE", "staging")
        // Warnings only (but the line that says where it listens): the collector's own spans, at
        // info, are filtered out, so the trace id can only come from the request's span.
        .env("CATRACA_LOG", "catraca::cli=info,warn")
        .env("CATRACA_LOG_FORMAT", "json")
        .env("CATRACA_PNCP_BASE_URL", "http://127.0.0.1:1/api/consulta");
    let created = cli.stdout(&[
        "keys", "create", "--name", "logs", "--role", "operator", "--json",
    ]);
    let key: Value = serde_json::from_str(&created).unwrap();
    let serve = Serve::start(&cli);

    // Act: the collection runs (its answer comes only after the retries; it is not waited for).
    let request = reqwest::Client::new()
        .post(serve.url("/process"))
        .header("x-api-key", key["key"].as_str().unwrap())
        .header("x-trace-id", "logs-trace-0003")
        .json(
            &serde_json::json!({"action": "licitacoes.collect", "context_id": "work", "payload": {
            "source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-01-01",
            "data_final": "2026-01-02", "modalidade": 6}}),
        )
        .send();
    let pending = tokio::spawn(request);
    serve.wait_for_stderr("the collector's retry", |e| {
        e.contains("page failed; retrying")
    });
    pending.abort();
    // Read now: a graceful stop would wait for the collection's retries.
    let stderr = serve.stderr();
    drop(serve);

    // Assert
    let retry: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "page failed; retrying")
        .unwrap_or_else(|| panic!("no retry line:\n{stderr}"));
    assert_eq!(retry["span"]["trace_id"], "logs-trace-0003", "{retry}");
}
