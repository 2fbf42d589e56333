//! End-to-end tests of Turnstile, driven the way a user drives it: the real `turnstile` binary
//! on `127.0.0.1:0`, over HTTP, with rule components built by `tests/build.rs`.
//!
//! One test binary, one module per area.

mod support;

mod api;
mod cli;
mod consistency;
mod crash;
mod damage;
mod durability;
mod kafka;
mod languages;
mod limits;
mod reload;
mod rules;
mod sandbox;
mod store;
mod toolkit;
mod wasi;
