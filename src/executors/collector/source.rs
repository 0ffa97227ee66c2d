//! Where a collector's pages come from: the HTTP source behind the [`PageSource`] trait, and
//! [`Pages`], which asks it politely (spacing, retries with backoff, a TTL cache) and reads PNCP's
//! pagination envelope.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

/// Most cached pages kept per collector; the oldest are dropped first.
const CACHE_CAPACITY: usize = 1_000;

/// The HTTP side of a collector: one GET, answered with status, content type and a bounded body.
#[async_trait]
pub trait PageSource: Send + Sync {
    async fn get(&self, url: &str, query: &[(String, String)]) -> Result<Fetched, FetchError>;
}

/// A response as the collector needs it.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("response larger than {0} bytes refused")]
    TooLarge(usize),
    #[error("unreachable: {0}")]
    Unreachable(String),
}

/// reqwest with an explicit timeout, no proxies, bounded body reads.
pub(super) struct HttpSource {
    client: reqwest::Client,
    timeout_ms: u64,
    max_bytes: usize,
}

impl HttpSource {
    /// A source whose requests take at most `timeout_ms` and whose bodies hold at most `max_bytes`.
    pub(super) fn new(timeout_ms: u64, max_bytes: usize) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms))
            .connect_timeout(Duration::from_millis(timeout_ms.min(10_000)))
            .no_proxy()
            .user_agent(concat!("catraca/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            client,
            timeout_ms,
            max_bytes,
        })
    }
}

#[async_trait]
impl PageSource for HttpSource {
    async fn get(&self, url: &str, query: &[(String, String)]) -> Result<Fetched, FetchError> {
        let sent = self
            .client
            .get(url)
            .query(query)
            .headers(crate::executors::upstream_trace_headers())
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(FetchError::Timeout(self.timeout_ms)),
            Err(e) => return Err(FetchError::Unreachable(e.without_url().to_string())),
        };
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_bytes {
                        return Err(FetchError::TooLarge(self.max_bytes));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(FetchError::Timeout(self.timeout_ms)),
                Err(e) => return Err(FetchError::Unreachable(e.without_url().to_string())),
            }
        }
        Ok(Fetched {
            status,
            content_type,
            body,
        })
    }
}

/// The PNCP pagination envelope.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Envelope {
    #[serde(default)]
    pub data: Vec<Value>,
    #[serde(default)]
    pub total_paginas: Option<u32>,
}

/// A cached page: when it was fetched and its body.
type CachedPage = (Instant, Arc<Vec<u8>>);

struct Cache {
    ttl: Duration,
    pages: Mutex<HashMap<String, CachedPage>>,
}

impl Cache {
    fn get(&self, key: &str) -> Option<Arc<Vec<u8>>> {
        let pages = self.pages.lock().ok()?;
        pages
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, body)| body.clone())
    }

    fn put(&self, key: String, body: Arc<Vec<u8>>) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut pages) = self.pages.lock() {
            if pages.len() >= CACHE_CAPACITY {
                let ttl = self.ttl;
                pages.retain(|_, (at, _)| at.elapsed() < ttl);
                if pages.len() >= CACHE_CAPACITY
                    && let Some(oldest) = pages
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(k, _)| k.clone())
                {
                    pages.remove(&oldest);
                }
            }
            pages.insert(key, (Instant::now(), body));
        }
    }
}

/// How a collector asks its source for pages.
pub(super) struct PagePolicy {
    /// Least time between two requests to the source.
    pub min_interval: Duration,
    pub page_size: u32,
    pub max_retries: u32,
    /// Wait before the first retry, doubled for each further one.
    pub retry_backoff: Duration,
    /// Pages fetched within this long are reused (zero disables the cache).
    pub cache_ttl: Duration,
}

/// The pages of one collector's source: politeness, retries and the cache in one place.
pub(super) struct Pages {
    /// The collector's name, for log lines.
    collector: String,
    source: Arc<dyn PageSource>,
    policy: PagePolicy,
    /// When the last request to the source was sent, to keep `min_interval` between requests.
    last_request: tokio::sync::Mutex<Option<Instant>>,
    cache: Cache,
}

impl Pages {
    pub(super) fn new(collector: &str, source: Arc<dyn PageSource>, policy: PagePolicy) -> Self {
        Self {
            collector: collector.to_owned(),
            source,
            cache: Cache {
                ttl: policy.cache_ttl,
                pages: Mutex::new(HashMap::new()),
            },
            policy,
            last_request: tokio::sync::Mutex::new(None),
        }
    }

    async fn wait_turn(&self) {
        let mut last = self.last_request.lock().await;
        let interval = self.policy.min_interval;
        if let Some(at) = *last {
            let since = at.elapsed();
            if since < interval {
                tokio::time::sleep(interval - since).await;
            }
        }
        *last = Some(Instant::now());
    }

    /// One page, with retries; `Ok(None)` is an empty page (204 or empty body).
    pub(super) async fn page(
        &self,
        url: &str,
        params: &[(String, String)],
        page: u32,
    ) -> Result<Option<Envelope>, String> {
        let mut query = params.to_vec();
        query.push(("pagina".to_owned(), page.to_string()));
        query.push((
            "tamanhoPagina".to_owned(),
            self.policy.page_size.to_string(),
        ));
        let cache_key = format!(
            "{url}?{}",
            serde_json::to_string(&query).unwrap_or_default()
        );
        if let Some(body) = self.cache.get(&cache_key) {
            return parse_page(&body).map_err(|e| format!("cached page: {e}"));
        }
        let mut attempt = 0;
        let mut backoff = self.policy.retry_backoff;
        loop {
            self.wait_turn().await;
            let error = match self.source.get(url, &query).await {
                Err(FetchError::TooLarge(n)) => {
                    return Err(format!("response larger than {n} bytes refused"));
                }
                Err(e) => e.to_string(),
                Ok(f) if f.status == 204 => return Ok(None),
                Ok(f) if f.status == 429 || f.status >= 500 => {
                    format!("HTTP {}: {}", f.status, snippet(&f.body))
                }
                Ok(f) if f.status >= 400 => {
                    // The source says the query is wrong; asking again will not help.
                    return Err(format!("HTTP {}: {}", f.status, error_message(&f.body)));
                }
                Ok(f) => match parse_page(&f.body) {
                    Ok(page) => {
                        self.cache.put(cache_key, Arc::new(f.body));
                        return Ok(page);
                    }
                    // HTML or plain text with a 200: a proxy or a maintenance page; try again.
                    Err(e) => format!("HTTP {} ({}): {e}", f.status, f.content_type),
                },
            };
            if attempt >= self.policy.max_retries {
                return Err(format!("{error} (after {} attempts)", attempt + 1));
            }
            attempt += 1;
            tracing::warn!(collector = %self.collector, page, attempt, %error, "page failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }
}

/// A short, single-line excerpt of a body for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(120).collect()
}

/// The `message` of a Spring Boot error body, else a snippet.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| snippet(body))
}

fn parse_page(body: &[u8]) -> Result<Option<Envelope>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if body.trim_ascii_start().first() == Some(&b'<') {
        return Err("an HTML body instead of JSON".into());
    }
    serde_json::from_slice::<Envelope>(body)
        .map(Some)
        .map_err(|e| format!("not a PNCP page: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_plain_text_and_empty_bodies_are_told_apart() {
        assert!(parse_page(b"").unwrap().is_none());
        assert!(parse_page(b"  <html><body>Limite</body></html>").is_err());
        assert!(parse_page("Erro na comunicação com o banco de dados.".as_bytes()).is_err());
        let p = parse_page(br#"{"data":[{"numeroControlePNCP":"1"}],"totalPaginas":3}"#)
            .unwrap()
            .unwrap();
        assert_eq!(p.total_paginas, Some(3));
    }
}
