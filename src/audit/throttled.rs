//! REQUESTS_THROTTLED: the bounded record of a throttled address's refusals.
//!
//! Once an address has spent its failed-credential budget, each further request it sends is refused at
//! G1 before any key is read. Writing three full events for each of those (tens of thousands a second
//! from one stranger) would let anyone fill the disk; writing nothing would hide the flood. So each
//! address's throttled refusals are counted here and written as one summary event per interval: the
//! count, the first and last trace id and time, the routes and the reason codes. Every request still
//! gets its trace id, its status and its metric count; nothing that reached the action matrix is ever
//! summarised.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use serde_json::json;
use time::OffsetDateTime;

use crate::domain::TraceId;
use crate::event::{EventType, PendingEvent, timestamp};
use crate::reason::ReasonCode;

/// Addresses tracked between two flushes. Past it, further addresses share one summary (`client_addr`
/// `"other"`), so a flood from many addresses costs at most this many events per interval (a few MB of
/// memory at worst).
const MAX_ADDRESSES: usize = 10_000;

struct Summary {
    count: u64,
    first_trace_id: TraceId,
    first_at: OffsetDateTime,
    last_trace_id: TraceId,
    last_at: OffsetDateTime,
    routes: BTreeMap<&'static str, u64>,
    reason_codes: BTreeMap<String, u64>,
}

/// Throttled refusals per address since the last flush.
#[derive(Default)]
pub struct ThrottledLedger {
    pending: Mutex<HashMap<Option<IpAddr>, Summary>>,
}

impl ThrottledLedger {
    /// Counts one throttled refusal of `client`.
    pub fn note(
        &self,
        client: IpAddr,
        trace_id: &TraceId,
        route: &'static str,
        codes: &[ReasonCode],
    ) {
        let now = OffsetDateTime::now_utc();
        let mut pending = match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let slot = if pending.contains_key(&Some(client)) || pending.len() < MAX_ADDRESSES {
            Some(client)
        } else {
            None
        };
        let summary = pending.entry(slot).or_insert_with(|| Summary {
            count: 0,
            first_trace_id: trace_id.clone(),
            first_at: now,
            last_trace_id: trace_id.clone(),
            last_at: now,
            routes: BTreeMap::new(),
            reason_codes: BTreeMap::new(),
        });
        summary.count += 1;
        summary.last_trace_id = trace_id.clone();
        summary.last_at = now;
        *summary.routes.entry(route).or_default() += 1;
        for code in codes {
            *summary
                .reason_codes
                .entry(code.as_str().to_owned())
                .or_default() += 1;
        }
    }

    /// Takes every pending summary as a REQUESTS_THROTTLED event, oldest address first.
    pub fn drain(&self) -> Vec<PendingEvent> {
        let taken = {
            let mut pending = match self.pending.lock() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            std::mem::take(&mut *pending)
        };
        let mut summaries: Vec<_> = taken.into_iter().collect();
        summaries.sort_by_key(|(_, s)| s.first_at);
        summaries
            .into_iter()
            .map(|(client, s)| {
                PendingEvent::new(
                    EventType::RequestsThrottled,
                    None,
                    json!({
                        "client_addr": client.map_or_else(|| "other".to_owned(), |c| c.to_string()),
                        "count": s.count,
                        "first_trace_id": s.first_trace_id.as_str(),
                        "first_at": timestamp(s.first_at),
                        "last_trace_id": s.last_trace_id.as_str(),
                        "last_at": timestamp(s.last_at),
                        "routes": s.routes,
                        "reason_codes": s.reason_codes,
                        "gate": "auth",
                    }),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(n: u32) -> TraceId {
        TraceId::parse(&format!("trace-{n:04}")).unwrap()
    }

    #[test]
    fn one_summary_per_address_counts_every_refusal() {
        let ledger = ThrottledLedger::default();
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        for n in 0..1000 {
            ledger.note(a, &trace(n), "/process", &[ReasonCode::RateLimited]);
        }
        ledger.note(
            b,
            &trace(5000),
            "/v1/audit/traces/{trace_id}",
            &[ReasonCode::RateLimited],
        );
        let events = ledger.drain();
        assert_eq!(events.len(), 2);
        let first = &events[0].fields();
        assert_eq!(first["client_addr"], "192.0.2.1");
        assert_eq!(first["count"], 1000);
        assert_eq!(first["first_trace_id"], "trace-0000");
        assert_eq!(first["last_trace_id"], "trace-0999");
        assert_eq!(first["reason_codes"]["RATE_LIMITED"], 1000);
        assert_eq!(first["routes"]["/process"], 1000);
        assert_eq!(events[1].fields()["client_addr"], "192.0.2.2");
        assert!(ledger.drain().is_empty(), "a drain empties the ledger");
    }

    #[test]
    fn past_the_address_bound_refusals_share_one_summary() {
        let ledger = ThrottledLedger::default();
        for n in 0..(MAX_ADDRESSES as u32 + 50) {
            let ip: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + n).into();
            ledger.note(
                ip,
                &trace(n % 10_000),
                "/process",
                &[ReasonCode::RateLimited],
            );
        }
        let events = ledger.drain();
        assert_eq!(events.len(), MAX_ADDRESSES + 1);
        let other = events
            .iter()
            .find(|e| e.fields()["client_addr"] == "other")
            .unwrap();
        assert_eq!(other.fields()["count"], 50);
    }
}
