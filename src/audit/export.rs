//! The auditors' export: events with `since <= occurred_at < until`, read in keyset-paginated pages
//! so memory stays flat however long the period, as JSON Lines or CSV.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{SealedEvent, timestamp};
use crate::store::{Store, StoreError};

/// Events exported per page: memory stays flat however long the period.
const EXPORT_PAGE: i64 = 5_000;

/// The first line of a CSV export.
pub const CSV_HEADER: &str =
    "occurred_at,chain_id,seq,event_type,trace_id,event_id,prev_hash,hash,body";

/// A time given for an export that is neither form [`parse_time`] reads.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is neither YYYY-MM-DD nor an RFC 3339 time")]
pub struct BadTime(String);

/// Parses `2026-11-22` (UTC midnight) or an RFC 3339 time into the trail's timestamp form.
pub fn parse_time(s: &str) -> Result<String, BadTime> {
    let t = if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        t
    } else {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(s, &format)
            .map(|d| d.midnight().assume_utc())
            .map_err(|_| BadTime(s.to_owned()))?
    };
    Ok(timestamp(t))
}

/// One CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// One event as a CSV line (without its line break), in the columns of [`CSV_HEADER`].
pub fn csv_line(e: &SealedEvent) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{}",
        e.occurred_at,
        csv_field(&e.chain_id),
        e.seq,
        e.event_type,
        csv_field(e.trace_id.as_deref().unwrap_or("")),
        e.event_id,
        e.prev_hash,
        e.hash,
        csv_field(&e.body)
    )
}

/// Where the next page starts: after this event, in export order (time, then chain position).
struct Cursor {
    occurred_at: String,
    chain_id: String,
    seq: i64,
}

/// An export in progress: hands out the period's events a page at a time, in export order.
pub struct Export {
    since: String,
    until: String,
    page_size: i64,
    after: Option<Cursor>,
    done: bool,
}

impl Export {
    /// The export of `since <= occurred_at < until` (both `YYYY-MM-DD` or RFC 3339); no `until` is now.
    pub fn new(since: &str, until: Option<&str>) -> Result<Self, BadTime> {
        let since = parse_time(since)?;
        let until = match until {
            Some(u) => parse_time(u)?,
            None => timestamp(OffsetDateTime::now_utc()),
        };
        Ok(Self {
            since,
            until,
            page_size: EXPORT_PAGE,
            after: None,
            done: false,
        })
    }

    /// The next page of events; empty once every event of the period has been handed out.
    pub async fn next_page(&mut self, store: &dyn Store) -> Result<Vec<SealedEvent>, StoreError> {
        if self.done {
            return Ok(Vec::new());
        }
        let after = self
            .after
            .as_ref()
            .map(|c| (c.occurred_at.as_str(), c.chain_id.as_str(), c.seq));
        let page = store
            .events_between(&self.since, &self.until, after, self.page_size)
            .await?;
        match page.last() {
            // A full page: there may be more after its last event.
            Some(last) if page.len() as i64 == self.page_size => {
                self.after = Some(Cursor {
                    occurred_at: last.occurred_at.clone(),
                    chain_id: last.chain_id.clone(),
                    seq: last.seq,
                });
            }
            _ => self.done = true,
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    /// An event at `at` (stores may read the envelope from the body, so it names the time too).
    fn event(chain: &str, seq: i64, at: &str) -> SealedEvent {
        let occurred_at = format!("2026-11-22T{at}.000000Z");
        let event_id = format!("{chain}-{seq}");
        SealedEvent {
            chain_id: chain.into(),
            seq,
            body: format!(
                r#"{{"chain_id":"{chain}","event_id":"{event_id}","event_type":"REQUEST_START","instance_id":"i","occurred_at":"{occurred_at}","prev_hash":"","seq":{seq},"trace_id":null}}"#
            ),
            event_id,
            event_type: "REQUEST_START".into(),
            trace_id: None,
            occurred_at,
            instance_id: "i".into(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[tokio::test]
    async fn pages_hand_out_every_event_of_the_period_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("e.db").display());
        let store = crate::store::SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        // Two chains sharing timestamps, so pages must break ties by chain and position.
        let events = [
            event("b", 1, "10:00:00"),
            event("a", 1, "10:00:00"),
            event("a", 2, "10:00:00"),
            event("b", 2, "11:00:00"),
            event("a", 3, "12:00:00"),
            event("a", 4, "23:00:00"),
        ];
        store.append_events(&events).await.unwrap();
        let mut export = Export::new("2026-11-22T09:00:00Z", Some("2026-11-22T13:00:00Z")).unwrap();
        export.page_size = 2;

        let mut seen = Vec::new();
        for _ in 0..10 {
            let page = export.next_page(&store).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            seen.extend(page.into_iter().map(|e| e.event_id));
        }

        assert_eq!(seen, ["a-1", "a-2", "b-1", "b-2", "a-3"]);
    }

    #[test]
    fn export_times_are_a_date_at_utc_midnight_or_rfc_3339() {
        let midnight = parse_time("2026-11-22").unwrap();
        assert!(midnight.starts_with("2026-11-22T00:00:00"), "{midnight}");
        let offset = parse_time("2026-11-22T10:00:00-03:00").unwrap();
        assert!(offset.starts_with("2026-11-22T13:00:00"), "{offset}");
        let err = parse_time("22/11/2026").unwrap_err().to_string();
        assert!(err.contains("YYYY-MM-DD"), "{err}");
    }
}
