//! Sends each signed checkpoint to a witness (`CATRACA_WITNESS_URL`): a copy of the chain heads held by
//! someone who is not the database's owner. A POST of the signed note (`text/plain`), bounded in time,
//! retried, and off the request path: the writer hands the note over without waiting, a failing witness
//! is counted (`catraca_witness_failures_total`) and alerted on, and requests never notice.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Notes waiting for the witness; past it a new note is dropped and counted (a later checkpoint of
/// the same chain commits to everything the dropped one did).
const QUEUE: usize = 256;
/// Tries per note.
const ATTEMPTS: u32 = 3;
/// Longest one POST may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before the second try; doubled before each next one.
const BACKOFF: Duration = Duration::from_millis(200);

/// The writer's side of the witness: hands notes over, never waits.
#[derive(Clone)]
pub struct Witness {
    tx: mpsc::Sender<String>,
    metrics: Metrics,
}

impl Witness {
    /// Starts sending to `url` on the current runtime.
    pub fn start(url: &str, metrics: Metrics) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| anyhow::anyhow!("CATRACA_WITNESS_URL {url:?} is not a URL: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            // The URL says where the witness is; no ambient HTTP(S)_PROXY in between.
            .no_proxy()
            .user_agent(concat!("catraca/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(rx, client, url, metrics.clone()));
        Ok(Self { tx, metrics })
    }

    /// Queues `note` for the witness; a full queue drops it, counted as a failure.
    pub fn offer(&self, note: String) {
        if self.tx.try_send(note).is_err() {
            self.metrics.witness_failures.inc();
            tracing::warn!("witness queue full: a checkpoint was not sent to the witness");
        }
    }
}

async fn deliver(
    mut rx: mpsc::Receiver<String>,
    client: reqwest::Client,
    url: reqwest::Url,
    metrics: Metrics,
) {
    while let Some(note) = rx.recv().await {
        let mut wait = BACKOFF;
        let mut last_error = String::new();
        let mut taken = false;
        for attempt in 1..=ATTEMPTS {
            let sent = client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(note.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    taken = true;
                    break;
                }
                Ok(r) => last_error = format!("answered {}", r.status()),
                Err(e) => last_error = e.to_string(),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
        if !taken {
            metrics.witness_failures.inc();
            tracing::warn!(witness = %url, error = %last_error, "the witness did not take a checkpoint");
        }
    }
}
