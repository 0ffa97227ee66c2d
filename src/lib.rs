//! Catraca: a governed agent gateway. Every request passes a turnstile of gates (trace, API key, rate
//! limit, input, action matrix) before an executor may act, and every step leaves a hash-chained,
//! append-only audit record.

pub mod app;
pub mod audit;
pub mod audit_read;
pub mod cli;
pub mod config;
pub mod domain;
pub mod executors;
pub mod gates;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod store;
