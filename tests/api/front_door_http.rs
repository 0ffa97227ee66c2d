//! The HTTP front door under slow, silent and too many connections: header, body and idle timeouts,
//! the connection cap and its 503 answer, and legitimate clients served meanwhile. Raw TCP sockets
//! play the misbehaving clients; reqwest plays the legitimate one.

use std::time::{Duration, Instant};

use catraca::config::HttpLimits;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, echo, spawn_app_with};
use crate::prom::sample;

/// Short limits so each test takes seconds; tests that need one limit longer say so.
fn limits(header: f64, body: f64, idle: f64, max_connections: usize) -> HttpLimits {
    HttpLimits {
        header_timeout: Duration::from_secs_f64(header),
        body_timeout: Duration::from_secs_f64(body),
        idle_timeout: Duration::from_secs_f64(idle),
        max_connections,
    }
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.addr).await.unwrap()
}

/// Reads until the server closes the connection (end of stream or reset), at most `bound`; returns how
/// long that took and what the server sent meanwhile.
async fn until_closed(
    stream: &mut (impl AsyncRead + Unpin),
    bound: Duration,
) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        match tokio::time::timeout_at((started + bound).into(), stream.read(&mut buf)).await {
            Err(_) => panic!("the connection was still open after {bound:?}"),
            Ok(Ok(0) | Err(_)) => return (started.elapsed(), received),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// A response read off a raw socket: status, lower-cased head and body.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }
}

/// Reads one response (head and a `content-length` body) within `bound`, leaving the connection open.
async fn read_response(stream: &mut TcpStream, bound: Duration) -> Raw {
    tokio::time::timeout(bound, async {
        let mut data = Vec::new();
        let mut buf = [0_u8; 4096];
        let head_end = loop {
            if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before a whole head: {:?}",
                String::from_utf8_lossy(&data)
            );
            data.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
        let status = head[9..12].parse().unwrap();
        let mut raw = Raw {
            status,
            head,
            body: data[head_end + 4..].to_vec(),
        };
        let length: usize = raw.header("content-length").unwrap().parse().unwrap();
        while raw.body.len() < length {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the whole body");
            raw.body.extend_from_slice(&buf[..n]);
        }
        raw
    })
    .await
    .unwrap_or_else(|_| panic!("no response within {bound:?}"))
}

const GET_HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n";

/// Sends `bytes` one at a time, `every` apart, until done or the server closes the connection.
fn trickle(
    mut stream: impl AsyncWrite + Unpin + Send + 'static,
    bytes: &'static [u8],
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for byte in bytes {
            if stream.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        // Hold the connection until the test ends.
        std::future::pending::<()>().await;
    })
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let app = spawn_app_with(|c| c.http = limits(1.0, 5.0, 5.0, 64)).await;
    let mut silent = connect(&app).await;

    let (after, received) = until_closed(&mut silent, Duration::from_secs(4)).await;

    assert!(received.is_empty(), "a silent client was sent {received:?}");
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );
}

#[tokio::test]
async fn headers_sent_a_byte_every_200_ms_are_cut_off_by_the_header_timeout() {
    let app = spawn_app_with(|c| c.http = limits(1.0, 5.0, 5.0, 64)).await;
    // One half of the socket trickles, the other watches for the close.
    let (mut watcher, writer) = connect(&app).await.into_split();
    let writer = trickle(writer, GET_HEALTH, Duration::from_millis(200));

    // The whole head would take 8 s at this pace; the header timeout is 1 s.
    let (after, received) = until_closed(&mut watcher, Duration::from_secs(4)).await;

    writer.abort();
    assert!(
        received.is_empty(),
        "a trickled head was answered: {received:?}"
    );
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_one() {
    // Idle longer than the header timeout: a connection waiting for its next request gets the idle
    // timeout, not the header one.
    let app = spawn_app_with(|c| c.http = limits(1.0, 5.0, 2.5, 64)).await;
    let mut conn = connect(&app).await;

    conn.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut conn, Duration::from_secs(5))
            .await
            .status,
        200
    );
    // Kept alive past the header timeout: a second request on the same connection is served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    conn.write_all(GET_HEALTH).await.unwrap();
    let second = read_response(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(second.status, 200);
    let (after, received) = until_closed(&mut conn, Duration::from_secs(8)).await;

    assert!(
        received.is_empty(),
        "an idle connection was sent {received:?}"
    );
    assert!(
        after >= Duration::from_millis(2000),
        "closed before the idle timeout: {after:?}"
    );
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_refused_408_input_timeout() {
    let app = spawn_app_with(|c| c.http = limits(5.0, 1.0, 5.0, 64)).await;
    let key = app.admin_key().await;
    let mut conn = connect(&app).await;
    let body = echo("olá").to_string();
    let head = format!(
        "POST /process HTTP/1.1\r\nhost: localhost\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );

    // The head and half the body, then nothing.
    let started = Instant::now();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .unwrap();
    let answer = read_response(&mut conn, Duration::from_secs(6)).await;

    assert_eq!(answer.status, 408);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let json = answer.json();
    assert_eq!(json["error"], "GATE_DENIED");
    assert_eq!(json["gate"], "input");
    assert_eq!(json["reason_codes"], serde_json::json!(["INPUT_TIMEOUT"]));
    let trace = answer.header("x-trace-id").unwrap().to_owned();
    assert_eq!(
        app.decision(&trace).await["reason_codes"],
        serde_json::json!(["INPUT_TIMEOUT"])
    );
    // The rest of that body would be read as the next request: the connection ends here.
    let (after, _) = until_closed(&mut conn, Duration::from_secs(4)).await;
    assert!(after < Duration::from_secs(3), "{after:?}");
}

#[tokio::test]
async fn shutdown_refuses_new_connections_and_lets_a_request_in_flight_finish() {
    let app = spawn_app_with(|c| c.http = limits(5.0, 10.0, 5.0, 64)).await;
    let key = app.admin_key().await;
    let addr = app.addr;
    let mut conn = connect(&app).await;
    let body = echo("still here").to_string();
    let head = format!(
        "POST /process HTTP/1.1\r\nhost: localhost\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(first).await.unwrap();
    // The request is in flight (its handler waits for the rest of the body) when shutdown begins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a new connection was accepted"
    );
    conn.write_all(rest).await.unwrap();
    let answer = read_response(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["result"]["message"], "still here");
    assert_eq!(answer.header("connection"), Some("close"));
    until_closed(&mut conn, Duration::from_secs(2)).await;
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn past_the_cap_a_connection_is_answered_503_at_once_and_served_again_once_silent_ones_close()
{
    let app = spawn_app_with(|c| c.http = limits(1.5, 5.0, 5.0, 3)).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect(&app).await);
    }
    // Each silent connection is accepted (and holds its permit) before the next client arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let mut over = connect(&app).await;
    over.write_all(GET_HEALTH).await.unwrap();
    let refused = read_response(&mut over, Duration::from_secs(1)).await;
    let answered_in = started.elapsed();

    assert_eq!(refused.status, 503);
    assert!(answered_in < Duration::from_secs(1), "{answered_in:?}");
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert_eq!(refused.header("connection"), Some("close"));
    let json = refused.json();
    assert_eq!(json["error"], "TOO_MANY_CONNECTIONS");
    assert_eq!(
        json["reason_codes"],
        serde_json::json!(["TOO_MANY_CONNECTIONS"])
    );
    assert_eq!(json["trace_id"].as_str(), refused.header("x-trace-id"));
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    until_closed(&mut over, Duration::from_secs(2)).await;

    // The header timeout frees the permits of the silent ones; then a normal client is served.
    for conn in &mut silent {
        until_closed(conn, Duration::from_secs(5)).await;
    }
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = app.get_text("/metrics").await;
    let refusals = sample(
        &metrics,
        "catraca_requests_total",
        &[
            ("route", "unmatched"),
            ("method", "other"),
            ("status", "503"),
        ],
    );
    assert_eq!(refusals, Some(1.0));
}

#[tokio::test]
async fn with_a_hundred_slow_and_silent_connections_open_a_normal_client_is_answered_promptly() {
    // Timeouts longer than the test: the slow ones stay open while the normal client asks.
    let app = spawn_app_with(|c| c.http = limits(30.0, 30.0, 30.0, 1024)).await;
    let mut silent = Vec::new();
    let mut slow = Vec::new();
    for i in 0..100 {
        let conn = connect(&app).await;
        if i % 2 == 0 {
            silent.push(conn);
        } else {
            slow.push(trickle(conn, GET_HEALTH, Duration::from_millis(200)));
        }
    }
    // Long enough for the gateway to have accepted them all and the slow ones to have sent a few bytes.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    let answered_in = started.elapsed();

    assert_eq!(health.status(), 200);
    assert!(answered_in < Duration::from_secs(2), "{answered_in:?}");
    // Shutdown does not wait for connections that have no request in flight.
    let started = Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for task in slow {
        task.abort();
    }
    for mut conn in silent {
        until_closed(&mut conn, Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn a_refusal_before_a_small_body_was_read_keeps_the_connection_for_the_next_request() {
    // Arrange: a refusal at G1 never reads the body; the server reads the small rest itself.
    let app = spawn_app_with(|_| {}).await;
    let mut stream = connect(&app).await;
    let body = echo("x").to_string();
    let request = format!(
        "POST /process HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );

    // Act: two refused requests and a probe, one after the other on one connection.
    stream.write_all(request.as_bytes()).await.unwrap();
    let first = read_response(&mut stream, Duration::from_secs(5)).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let second = read_response(&mut stream, Duration::from_secs(5)).await;
    stream.write_all(GET_HEALTH).await.unwrap();
    let health = read_response(&mut stream, Duration::from_secs(5)).await;

    // Assert
    assert_eq!((first.status, second.status), (401, 401));
    assert_eq!(first.header("connection"), None, "kept alive");
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn a_refusal_before_a_large_body_was_read_closes_the_connection_cleanly() {
    // Arrange: a body announced past what the server reads for a refused request (64 KiB), of which
    // only the start is sent.
    let app = spawn_app_with(|_| {}).await;
    let mut stream = connect(&app).await;
    let request = "POST /process HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 200000\r\n\r\n{\"action\":";

    // Act
    stream.write_all(request.as_bytes()).await.unwrap();
    let refused = read_response(&mut stream, Duration::from_secs(5)).await;
    let mut kept = connect(&app).await;
    kept.write_all(GET_HEALTH).await.unwrap();
    let health = read_response(&mut kept, Duration::from_secs(5)).await;

    // Assert: the client is told, instead of finding out by writing into a closing socket.
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("connection"), Some("close"));
    until_closed(&mut stream, Duration::from_secs(2)).await;
    assert_eq!(health.status, 200);
    assert_eq!(
        health.header("connection"),
        None,
        "a bodiless request keeps its connection"
    );
}
