//! # Turnstile
//!
//! A runtime for keyed state machines whose transition rules are WebAssembly components: the
//! method of patent CN 115391365 A (one thread per partition, a route cache from user to key)
//! with the business rules in a sandbox.
//!
//! # Layout
//!
//! - [`breaker`]: the failure budget: a per-key circuit breaker in the partition engine.
//! - [`bench`]: `turnstile bench`: the runtime under load, and the baselines it is compared with.
//! - [`config`]: the TOML configuration, defaults and validation.
//! - [`metrics`]: Prometheus metrics in atomics, rendered on `GET /metrics`.
//! - [`model`]: requests, states, outcomes and decisions, the host's own types.
//! - [`router`]: the partitioner (`abs(hash(key)) % N`) and the user → key route cache.
//! - [`sandbox`]: the wasmtime engine, load-time checks, per-call limits, the deterministic WASI
//!   and the compiled-component cache; the only `bindgen!`.
//! - [`store`]: one redb database per partition: states, routes, dedup, log, dead letters, in a
//!   compact binary record format; `turnstile inspect` prints them as JSON lines.
//! - [`native`]: the reference rule compiled natively, the benchmark's sandbox-cost baseline.
//! - [`partition`]: one thread per partition: its queue, its rule instance, its store, group commit.
//! - [`runtime`]: the library API: submit a request, read keys and users, inspect partitions.
//! - [`repartition`]: `turnstile repartition`: a data dir to another N or hash, all or nothing.
//! - [`install`]: installs and rollbacks over the partition threads of either mode.
//! - [`reload`]: hot reload: rule versions, install, rollback, canary, the watched file.
//! - [`replay`]: `turnstile replay`: shadow evaluation of a candidate rule over a data dir's log.
//! - [`verify`]: `turnstile verify`: every record of a stopped data dir checked for damage.
//! - [`progress`]: a terminal progress bar for long commands.
//! - [`service`]: the one interface the HTTP front end talks to, over either mode.
//! - [`api`]: the HTTP API over the service.
//! - [`server`]: `turnstile run`: runtime + HTTP server + clean shutdown.
//! - [`scenario`]: `turnstile test`: scenario files run against a rule in fresh runtimes.
//! - [`toolkit`]: the rule author's commands: `build`, `check`.
//! - [`kafka`]: Kafka mode: partitions shared by a group of processes over a Kafka-protocol log;
//!   the same partition engine behind a Kafka transport, two shared consumers split into one
//!   queue per owned partition, the changelog with fencing, the cluster's agreed layout, and
//!   the broker watch (suspend on broker loss, rejoin, stop on data loss).
//! - [`logging`]: `tracing` setup.

pub mod api;
pub mod backup;
pub mod bench;
pub mod breaker;
pub mod config;
pub mod install;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod native;
pub mod partition;
pub mod progress;
pub mod reload;
pub mod repartition;
pub mod replay;
pub mod router;
pub mod runtime;
pub mod sandbox;
pub mod scenario;
pub mod server;
pub mod service;
pub mod store;
pub mod toolkit;
pub mod verify;
