//! # Turnstile
//!
//! A runtime for keyed state machines whose transition rules are WebAssembly components.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration, defaults and validation.
//! - [`model`]: requests, states, outcomes and decisions, the host's own types.
//! - [`router`]: the partitioner (`abs(hash(key)) % N`) and the user → key route cache.
//! - [`partition`]: one thread per partition: its queue, its rule instance, its store, group commit.
//! - [`runtime`]: the library API: submit a request, read keys and users, inspect partitions.
//! - [`sandbox`]: the wasmtime engine, load-time checks, per-call limits; the only `bindgen!`.
//! - [`store`]: one redb database per partition: states, routes, dedup, log, dead letters.
pub mod config;
pub mod partition;
pub mod model;
pub mod router;
pub mod runtime;
pub mod sandbox;
pub mod store;
