//! Integration tests: a real gateway on a loopback port per test, a fresh SQLite database each.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test that cannot set itself up should fail loudly at that line"
)]

mod binary;
mod helpers;
mod prom;

mod audit_trail;
mod audit_verify;
mod auth;
mod cli;
mod collector;
mod composite;
mod console;
mod facades;
mod front_door;
mod front_door_http;
mod gates;
mod http;
mod keys;
mod keys_http;
mod llm;
mod logs;
mod policy_reload;
mod receipts;
mod secrets;
mod startup;
mod store;
mod switches;
mod tls;
