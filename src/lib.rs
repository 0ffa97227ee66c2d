//! Catraca: a governed agent gateway. Every request passes a turnstile of gates (trace, API key, rate
//! limit, input, action matrix) before an executor may act, and every step leaves a hash-chained,
//! append-only audit record.
//!
//! Layers, each importing only those below it: `domain`, `reason`, `config`, `metrics` → `event` (audit
//! events and their hash chain) → `store`, `policy` → `audit` → `keys`, `executors` → `error` → `serve`
//! (the HTTP connection loop and its limits) → `gates` → `app` → `turnstile` → `audit_read` → `http`
//! → `startup` → `cli`.

pub mod app;
pub mod audit;
pub mod audit_read;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod event;
pub mod executors;
pub mod gates;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod reason;
pub mod serve;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod turnstile;
pub mod watch;
