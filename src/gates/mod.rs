//! The gates, one file each, in the order a request meets them: G0 [`trace`] (and the [`client`]
//! address), G1 [`auth`], G2 [`rate_limit`] (in-process, or [`rate_limit_redis`] shared by every
//! instance, behind a [`limiter_breaker`]), G3 [`input`], G4 [`matrix`]. Each decides one thing; the turnstile (`crate::turnstile`) runs them in order, records
//! their verdicts and makes the decision durable.

pub mod auth;
pub mod client;
pub mod input;
pub mod key_directory;
pub mod limiter_breaker;
pub mod matrix;
pub mod rate_limit;
pub mod rate_limit_redis;
pub mod trace;
