//! Configuration: the TOML file, its defaults, and the checks that refuse a bad one.
//!
//! Every section and key is documented in `turnstile.toml` at the repository root. Unknown keys
//! and wrong types are errors (serde's `deny_unknown_fields`), and the message names the key, so
//! a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::router::HashKind;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The HTTP server.
    pub server: ServerConfig,
    /// How many partitions there are and how keys map to them.
    pub partitions: PartitionsConfig,
    /// The route cache (user → key).
    pub routes: RoutesConfig,
    /// The rule component and the limits it runs under.
    pub rule: RuleConfig,
    /// The per-partition store.
    pub store: StoreConfig,
    /// The admin API (hot reload).
    pub admin: AdminConfig,
    /// Kafka mode: partitions consumed from a Kafka-protocol log by a group of processes.
    pub kafka: Option<KafkaConfig>,
    /// Logging.
    pub log: LogConfig,
}

/// `[kafka]`: present means Kafka mode.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port,host:port`.
    pub brokers: String,
    /// Consumer group every `turnstile run` process of the cluster joins.
    pub group: String,
    /// Requests, N partitions, keyed by routing key.
    pub requests_topic: String,
    /// Decisions, keyed by request id; every process reads it to answer its HTTP clients.
    pub outcomes_topic: String,
    /// Each partition's state changes with the request offset that made them, N partitions:
    /// what a process that gains a partition restores from.
    pub changelog_topic: String,
    /// user → key routes, read by every process (the shared route cache).
    pub routes_topic: String,
    /// Group session timeout: how long a dead process keeps its partitions, in milliseconds.
    pub session_timeout_ms: u64,
    /// How long an HTTP request waits for its outcome before answering 504, in milliseconds.
    pub reply_timeout_ms: u64,
    /// How long a request with only a user waits for the user's route to arrive from the
    /// routes topic (it may have been recorded by another process a moment ago), in milliseconds.
    pub route_wait_ms: u64,
    /// Replicas of each topic Turnstile creates; unset means 3, or fewer when the cluster has
    /// fewer brokers (a single test broker gets 1).
    pub replication_factor: Option<i32>,
    /// How long the requests and outcomes topics keep records, in milliseconds (`retention.ms`
    /// of the topics Turnstile creates). The changelog and routes topics are compacted instead:
    /// the newest record of each key is kept forever.
    pub retention_ms: u64,
    /// `[kafka.client]`: librdkafka properties given to every Kafka client of the process
    /// (security, TLS, SASL, timeouts), e.g. `"security.protocol" = "SASL_SSL"`. The properties
    /// Turnstile's guarantees rest on (group, offsets, idempotence, isolation) are set after
    /// these and win.
    pub client: std::collections::BTreeMap<String, String>,
    /// How often the broker watch asks the broker for the cluster's topics, in milliseconds;
    /// two failed checks in a row suspend this process's partitions until the broker answers
    /// (and a broker that answers without the cluster's data stops them for good).
    pub broker_check_ms: u64,
    /// The URL other processes and clients reach this process's HTTP API at (e.g.
    /// `http://10.0.0.7:7001`), announced with the partitions it owns so that a process asked
    /// about a partition it does not own can name the owner. Unset: `http://` + the bound
    /// address (useless to others when bound to 0.0.0.0: set it then).
    pub advertised_url: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group: "turnstile".into(),
            requests_topic: "turnstile-requests".into(),
            outcomes_topic: "turnstile-outcomes".into(),
            changelog_topic: "turnstile-changelog".into(),
            routes_topic: "turnstile-routes".into(),
            session_timeout_ms: 6000,
            reply_timeout_ms: 30_000,
            route_wait_ms: 3000,
            replication_factor: None,
            retention_ms: 7 * 24 * 3600 * 1000,
            client: Default::default(),
            broker_check_ms: 500,
            advertised_url: None,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token of the admin API; `TURNSTILE_ADMIN_TOKEN` overrides it. Without one the
    /// admin API is off.
    pub token: Option<String>,
}

impl AdminConfig {
    /// The token in force: the environment's, else the file's; empty counts as none.
    pub fn effective_token(&self) -> Option<String> {
        std::env::var("TURNSTILE_ADMIN_TOKEN")
            .ok()
            .or_else(|| self.token.clone())
            .filter(|t| !t.is_empty())
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP API listens on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger bodies get 413 before any parsing.
    pub max_body_bytes: usize,
    /// Most open client connections; further clients wait in the kernel's accept queue. Kept
    /// below the open-file limit (lowered at start if it is not), so the process always has
    /// descriptors for its own files and a flood of connections cannot starve it.
    pub max_connections: usize,
    /// Time a client has to send a request's line and headers; a slower (slowloris) connection
    /// is closed, freeing its slot.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a request's whole body once its headers arrived (408).
    pub body_read_timeout_ms: u64,
    /// Longest a request may take from its headers to its answer (503 `request_timeout`):
    /// bounds how long a stalled disk holds a client.
    pub request_timeout_ms: u64,
    /// On SIGTERM/SIGINT, time in-flight connections get to finish before they are closed.
    pub shutdown_timeout_ms: u64,
    /// `/readyz` says not ready while a partition with queued work has not completed a batch
    /// for this long (a stalled disk, a stuck rule).
    pub readiness_stall_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            max_body_bytes: 64 * 1024,
            max_connections: 512,
            header_read_timeout_ms: 5_000,
            body_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            shutdown_timeout_ms: 10_000,
            readiness_stall_ms: 5_000,
        }
    }
}

/// `[partitions]`: N = servers × containers (patent claim 6).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionsConfig {
    /// Number of servers in the deployment.
    pub servers: u32,
    /// Number of containers per server.
    pub containers: u32,
    /// Hash function of the partitioner.
    pub hash: HashKind,
    /// Capacity of each partition's queue; a full queue answers 503 (backpressure).
    pub queue_capacity: usize,
    /// Most requests one partition applies in one group commit.
    pub max_batch: usize,
}

impl Default for PartitionsConfig {
    fn default() -> Self {
        PartitionsConfig {
            servers: 1,
            containers: 4,
            hash: HashKind::Java,
            queue_capacity: 4096,
            max_batch: 256,
        }
    }
}

impl PartitionsConfig {
    /// N, the number of partitions.
    pub fn count(&self) -> u32 {
        self.servers.saturating_mul(self.containers)
    }
}

/// `[routes]`: the temporary route cache of patent claims 3 and 5.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    /// How long a user's route lives after its last keyed request, in seconds.
    pub ttl_seconds: u64,
    /// Most routes kept in memory; older ones are still found in the partitions' stores.
    pub capacity: usize,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        RoutesConfig {
            ttl_seconds: 24 * 60 * 60,
            capacity: 1_000_000,
        }
    }
}

impl RoutesConfig {
    /// The TTL as a duration.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_seconds)
    }
}

/// `[rule]`: which component decides transitions, and the sandbox it runs in.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    /// Path of the rule component; none means the embedded reference rule.
    pub path: Option<PathBuf>,
    /// Instruction budget of one call (wasmtime fuel).
    pub fuel: u64,
    /// CPU-time limit of one call (its thread's; time descheduled does not count), in milliseconds.
    pub deadline_ms: u64,
    /// Most linear memory a rule instance may have, in bytes.
    pub max_memory_bytes: usize,
    /// Most bytes of a rule component file.
    pub max_module_bytes: usize,
    /// Most functions in a rule component (all its core modules together).
    pub max_functions: u64,
    /// Most bytes of each string a rule returns (status, data, reject reason).
    pub max_output_bytes: usize,
    /// Whether each call starts from the component's initial state (`per_call`) or a partition
    /// keeps one instance between calls (`warm_instance_leaks_state`: faster, leaks state).
    pub isolation: crate::sandbox::Isolation,
    /// Guard pages and Spectre-hardened bounds checks (wasmtime's defaults) instead of plain
    /// explicit bounds checks: safer against a rule that probes host memory speculatively, but
    /// every per-call instance then costs `mprotect` calls and TLB shootdowns.
    pub spectre_hardening: bool,
    /// Most bytes of a failure's detail (a trap's text) kept in a dead letter.
    pub max_failure_detail_bytes: usize,
    /// Rule log lines each partition may write per second; the rest are dropped and counted.
    pub max_log_lines_per_second: u32,
    /// Rule failures of one key within `breaker_window_ms` that quarantine the key (its
    /// requests refused at once with `rule_quarantined`); 0 turns the breaker off.
    pub breaker_failures: u32,
    /// The window `breaker_failures` are counted in, in milliseconds.
    pub breaker_window_ms: u64,
    /// How long a quarantined key is refused before one request is let through, in milliseconds.
    pub breaker_cooldown_ms: u64,
    /// Most CPU time compiling a component may take, in milliseconds; slower ones are refused.
    pub max_compile_ms: u64,
    /// Compiled versions kept in memory besides the ones partitions run (older ones are
    /// dropped, and compiled again from the data dir if a rollback needs them).
    pub max_idle_compiled_versions: usize,
    /// Reload the rule when the file at `path` changes.
    pub watch: bool,
    /// How often the watched file is checked, in milliseconds.
    pub watch_interval_ms: u64,
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig {
            path: None,
            fuel: 10_000_000,
            deadline_ms: 100,
            max_memory_bytes: 16 * 1024 * 1024,
            // A JavaScript or Python rule carries its interpreter: 12 and 18 MB, 13 000
            // functions (BENCHMARKS.md, issue 17).
            max_module_bytes: 32 * 1024 * 1024,
            max_functions: 40_000,
            max_output_bytes: 64 * 1024,
            isolation: crate::sandbox::Isolation::PerCall,
            spectre_hardening: false,
            max_failure_detail_bytes: 4096,
            max_log_lines_per_second: 100,
            breaker_failures: 10,
            breaker_window_ms: 10_000,
            breaker_cooldown_ms: 30_000,
            // Compiling a JavaScript or Python rule takes 20-25 s of one core.
            max_compile_ms: 60_000,
            max_idle_compiled_versions: 2,
            watch: false,
            watch_interval_ms: 500,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the partition files; none keeps all state in memory (lost on exit).
    pub data_dir: Option<PathBuf>,
    /// `sync`: a request is acknowledged only after its batch is on disk. `none`: commits are
    /// not synced before the answer; a crash loses at most `flush_interval_ms` of them.
    pub durability: Durability,
    /// With durability `none`: the longest time a committed batch waits before it is synced to
    /// disk (a partition with unsynced batches syncs when this has passed, busy or idle, and on
    /// shutdown), in milliseconds.
    pub flush_interval_ms: u64,
    /// How many client request ids each partition remembers for deduplication.
    pub dedup_retention: u64,
    /// How many dead letters each partition keeps; older ones are pruned.
    pub dead_letter_retention: u64,
    /// Most log entries each partition keeps (the oldest are removed as new ones arrive);
    /// 0 keeps them all, which is what `turnstile replay` needs to see every decision.
    pub log_retention: u64,
    /// Log entries older than this are removed, in seconds; 0 keeps them all.
    pub log_retention_seconds: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data_dir: None,
            durability: Durability::Sync,
            flush_interval_ms: 1000,
            dedup_retention: 1_000_000,
            dead_letter_retention: crate::store::DEFAULT_DEAD_LETTER_RETENTION,
            log_retention: 0,
            log_retention_seconds: 0,
        }
    }
}

/// When a commit counts as done.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Synced to disk before the requests are acknowledged.
    Sync,
    /// Not synced; a crash may lose recently acknowledged requests.
    None,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `turnstile=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, ...).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and its line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.partitions;
        if p.servers == 0 {
            return Err(invalid("partitions.servers must be at least 1"));
        }
        if p.containers == 0 {
            return Err(invalid("partitions.containers must be at least 1"));
        }
        if let Some(kafka) = &self.kafka
            && !(10..=60_000).contains(&kafka.broker_check_ms)
        {
            return Err(invalid(format!(
                "kafka.broker_check_ms must be between 10 and 60000 (is {})",
                kafka.broker_check_ms
            )));
        }
        if p.count() < 2 {
            return Err(invalid(format!(
                "partitions.servers × partitions.containers must be at least 2 (is {})",
                p.count()
            )));
        }
        if p.count() > 4096 {
            return Err(invalid(format!(
                "partitions.servers × partitions.containers is {}; at most 4096 partitions (one thread each)",
                p.count()
            )));
        }
        if p.queue_capacity == 0 {
            return Err(invalid("partitions.queue_capacity must be at least 1"));
        }
        if p.max_batch == 0 {
            return Err(invalid("partitions.max_batch must be at least 1"));
        }
        if self.store.flush_interval_ms == 0 {
            return Err(invalid("store.flush_interval_ms must be at least 1"));
        }
        if self.routes.capacity == 0 {
            return Err(invalid("routes.capacity must be at least 1"));
        }
        if self.routes.ttl_seconds == 0 {
            return Err(invalid("routes.ttl_seconds must be at least 1"));
        }
        let r = &self.rule;
        if r.fuel == 0 {
            return Err(invalid("rule.fuel must be at least 1"));
        }
        if r.deadline_ms == 0 {
            return Err(invalid("rule.deadline_ms must be at least 1"));
        }
        if r.max_memory_bytes < 64 * 1024 {
            return Err(invalid(
                "rule.max_memory_bytes must be at least 65536 (one wasm page)",
            ));
        }
        if r.max_module_bytes == 0 || r.max_output_bytes == 0 {
            return Err(invalid(
                "rule.max_module_bytes and rule.max_output_bytes must be at least 1",
            ));
        }
        if self.store.dead_letter_retention == 0 {
            return Err(invalid("store.dead_letter_retention must be at least 1"));
        }
        if r.max_functions == 0 {
            return Err(invalid("rule.max_functions must be at least 1"));
        }
        if r.max_failure_detail_bytes < 64 {
            return Err(invalid("rule.max_failure_detail_bytes must be at least 64"));
        }
        if r.max_compile_ms == 0 {
            return Err(invalid("rule.max_compile_ms must be at least 1"));
        }
        if r.max_idle_compiled_versions == 0 {
            // An install compiles the new version before any partition runs it: it must stay.
            return Err(invalid(
                "rule.max_idle_compiled_versions must be at least 1",
            ));
        }
        if r.breaker_failures > 0 && (r.breaker_window_ms == 0 || r.breaker_cooldown_ms == 0) {
            return Err(invalid(
                "rule.breaker_window_ms and rule.breaker_cooldown_ms must be at least 1 when rule.breaker_failures is set",
            ));
        }
        if r.watch && r.path.is_none() {
            return Err(invalid(
                "rule.watch needs rule.path (or --rule): there is no file to watch",
            ));
        }
        if r.watch_interval_ms == 0 {
            return Err(invalid("rule.watch_interval_ms must be at least 1"));
        }
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes must be at least 1"));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections must be at least 1"));
        }
        for (name, ms) in [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.body_read_timeout_ms",
                self.server.body_read_timeout_ms,
            ),
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            ("server.readiness_stall_ms", self.server.readiness_stall_ms),
        ] {
            if ms == 0 {
                return Err(invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert_eq!(Config::default().partitions.count(), 4);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[partitions]\nserverz = 2\n").unwrap_err();
        assert!(err.to_string().contains("serverz"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[partitions]\nservers = \"two\"\n").unwrap_err();
        assert!(err.to_string().contains("servers"), "{err}");
    }

    #[test]
    fn zero_partitions_is_refused() {
        let err = Config::parse("[partitions]\nservers = 0\n").unwrap_err();
        assert!(err.to_string().contains("partitions.servers"), "{err}");
        let err = Config::parse("[partitions]\nservers = 1\ncontainers = 1\n").unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
    }

    #[test]
    fn kafka_section_turns_kafka_mode_on() {
        let config = Config::parse("[kafka]\nbrokers = \"b:9092\"\n").unwrap();
        let kafka = config.kafka.unwrap();
        assert_eq!(kafka.brokers, "b:9092");
        assert_eq!(kafka.group, "turnstile");
        assert!(Config::parse("").unwrap().kafka.is_none());
        // A data dir keeps each owned partition's state locally (delta restores).
        assert!(Config::parse("[kafka]\n[store]\ndata_dir = \"d\"\n").is_ok());
        // Each process of a cluster may watch its rule file (installs are per process).
        assert!(Config::parse("[kafka]\n[rule]\npath = \"r.wasm\"\nwatch = true\n").is_ok());
        let err = Config::parse("[kafka]\nbrokerz = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../turnstile.toml");
        Config::parse(text).unwrap();
    }
}
