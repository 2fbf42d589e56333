//! The sandbox: the wasmtime engine, the checks a rule component must pass to be loaded, the
//! limits every call runs under, and the one place that turns host values into WIT values.
//!
//! Only this module calls `bindgen!`. One [`Sandbox`] (one `Engine`, one `Linker`) serves the
//! process; a rule is compiled once into a [`CompiledRule`] (a pre-instantiated component shared
//! by all partitions), and each partition thread makes its own [`RuleInstance`] from it: its own
//! `Store`, its own instance, used from that thread only.
//!
//! Limits per call: fuel (instructions), an epoch deadline (wall clock, driven by a ticker
//! thread), a linear-memory cap, and a cap on returned strings. After any trap wasmtime poisons
//! the whole `Store` (even a fresh instance in it cannot be entered), so a failed call replaces the
//! `Store` and the instance before the next request.
//!
//! Rules get no WASI: a component that imports anything but `log` (and the contract's types) is
//! refused at load with a message naming the imports. That keeps rules deterministic, which replay
//! depends on. Build rules for `wasm32-unknown-unknown` (`turnstile build` does); `wasm32-wasip2`
//! output imports `wasi:cli` and is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};

use crate::config::RuleConfig;
use crate::model::{Outcome, RoutedRequest, State};

mod bindings {
    wasmtime::component::bindgen!({
        world: "rule",
        path: "../wit",
    });
}

use bindings::turnstile::rule::types as wit;

/// The reference rule (`guest/rules/reservation`), built into the binary by `build.rs`.
pub const REFERENCE_RULE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reservation.wasm"));

/// How often the epoch ticker advances the engine's clock; the deadline's resolution.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Longest log line a rule may write; longer ones are cut, so a rule cannot flood the log.
const MAX_LOG_LINE: usize = 1024;

/// How the SDK's panic hook starts the error log line it sends before the rule traps.
const PANIC_LOG_PREFIX: &str = "panicked at";

/// Imports a rule component may have: the world's `log` function, and the instance of types the
/// world `use`s (it carries no functions).
const ALLOWED_IMPORTS: &[&str] = &["log", "turnstile:rule/types@0.1.0"];

/// The limits one rule call runs under.
#[derive(Debug, Clone)]
pub struct RuleLimits {
    /// Fuel given to each call.
    pub fuel: u64,
    /// Wall-clock limit of each call.
    pub deadline: Duration,
    /// Linear-memory cap per instance, in bytes.
    pub max_memory_bytes: usize,
    /// Largest component accepted, in bytes.
    pub max_module_bytes: usize,
    /// Largest string a rule may return, in bytes.
    pub max_output_bytes: usize,
}

impl From<&RuleConfig> for RuleLimits {
    fn from(c: &RuleConfig) -> Self {
        RuleLimits {
            fuel: c.fuel,
            deadline: Duration::from_millis(c.deadline_ms),
            max_memory_bytes: c.max_memory_bytes,
            max_module_bytes: c.max_module_bytes,
            max_output_bytes: c.max_output_bytes,
        }
    }
}

/// Why a component was refused at load. The message names the problem for the operator.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bigger than `rule.max_module_bytes`.
    #[error(
        "the component is {size} bytes, more than the {max}-byte limit (rule.max_module_bytes)"
    )]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Does not start with the wasm magic number.
    #[error("not a WebAssembly file (no `\\0asm` header)")]
    NotWasm,
    /// A core module, not a component.
    #[error(
        "a core WebAssembly module, not a component; build rules with `turnstile build`, which wraps the module into a component"
    )]
    CoreModule,
    /// wasmtime could not compile it.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// It imports something the world does not offer.
    #[error(
        "the component imports {0}, which rules may not use (only `log` is offered; rules get no WASI: build for wasm32-unknown-unknown)"
    )]
    ForbiddenImport(String),
    /// It does not implement the `turnstile:rule/rule` world.
    #[error("the component does not implement the turnstile:rule world: {0}")]
    WrongWorld(String),
}

/// Why a rule call failed. Each kind maps to one API error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The rule trapped (panic, unreachable, stack overflow, bad memory access).
    Trap,
    /// The rule used up its fuel.
    FuelExhausted,
    /// The rule ran past its wall-clock deadline.
    Deadline,
    /// The rule tried to grow its memory past the cap.
    Memory,
    /// The rule returned something the host refuses (empty status, invalid JSON, too long).
    Output,
}

impl FailureKind {
    /// Every kind, in a fixed order (for counters).
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Trap,
        FailureKind::FuelExhausted,
        FailureKind::Deadline,
        FailureKind::Memory,
        FailureKind::Output,
    ];

    /// The kind an API error code names, if it names one.
    pub fn from_code(code: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The API error code.
    pub fn code(self) -> &'static str {
        match self {
            FailureKind::Trap => "rule_trap",
            FailureKind::FuelExhausted => "rule_fuel_exhausted",
            FailureKind::Deadline => "rule_deadline",
            FailureKind::Memory => "rule_memory",
            FailureKind::Output => "rule_output",
        }
    }
}

/// A failed rule call.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct RuleFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, for the operator.
    pub message: String,
}

/// The process-wide engine and linker, with the epoch ticker that enforces deadlines.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<HostState>,
    limits: RuleLimits,
    /// Tells the ticker thread to stop when the sandbox goes away.
    ticker_stop: Arc<AtomicBool>,
    /// Rules compiled by [`Sandbox::compile_shared`], by version, so starting many runtimes
    /// with one rule (`turnstile test`) compiles it once.
    shared: std::sync::Mutex<std::collections::HashMap<String, Arc<CompiledRule>>>,
    /// Where rule log lines are also collected, for `turnstile test` to show them per step
    /// (issue 16); `None` in the server.
    log_capture: Option<RuleLogs>,
}

/// Rule log lines collected by a capturing sandbox ([`Sandbox::new_capturing_logs`]), as
/// `LEVEL message`; at most [`MAX_CAPTURED_LINES`] are kept until taken, then a count of the rest.
#[derive(Debug, Clone, Default)]
pub struct RuleLogs(Arc<std::sync::Mutex<(Vec<String>, usize)>>);

/// Most rule log lines kept between two [`RuleLogs::take`]s: a rule logging in a loop must not
/// flood `turnstile test`'s output.
const MAX_CAPTURED_LINES: usize = 50;

impl RuleLogs {
    fn push(&self, line: String) {
        let mut logs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if logs.0.len() < MAX_CAPTURED_LINES {
            logs.0.push(line);
        } else {
            logs.1 += 1;
        }
    }

    /// The lines collected since the last call, and how many more were dropped.
    pub fn take(&self) -> (Vec<String>, usize) {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// A compiled, checked, pre-instantiated rule, shared by every partition that runs it.
pub struct CompiledRule {
    /// sha256 of the component bytes, in hex: the rule's version id everywhere.
    pub version: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// Names of the component's imports.
    pub imports: Vec<String>,
    /// Names of the component's exports.
    pub exports: Vec<String>,
    pre: bindings::RulePre<HostState>,
}

impl std::fmt::Debug for CompiledRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRule")
            .field("version", &self.version)
            .field("size", &self.size)
            .finish()
    }
}

/// The per-`Store` data: what host functions and the limiter need.
pub struct HostState {
    limiter: MemoryLimiter,
    /// Partition this instance belongs to, for log lines.
    partition: u32,
    /// Short rule version, for log lines.
    rule_version: Arc<str>,
    /// The panic message the SDK's panic hook logged during the current call (issue 16): a
    /// panic ends in a bare `unreachable` trap, so this is the only place its reason survives.
    panic_message: Option<String>,
    /// The sandbox's log capture, if it has one.
    log_capture: Option<RuleLogs>,
}

/// Caps linear memory and remembers whether it refused a growth, so a memory bomb is reported as
/// `rule_memory` and not as the `unreachable` a failed allocation turns into.
struct MemoryLimiter {
    max_memory_bytes: usize,
    refused_growth: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            self.refused_growth = true;
            wasmtime::bail!(
                "memory limit: the rule asked for {desired} bytes, the cap is {}",
                self.max_memory_bytes
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        16
    }

    fn tables(&self) -> usize {
        16
    }

    fn memories(&self) -> usize {
        4
    }
}

impl bindings::RuleImports for HostState {
    fn log(&mut self, level: wit::Level, message: String) {
        let message = truncate(&message, MAX_LOG_LINE);
        // The SDK's panic hook logs `panicked at <file:line:col>: <message>` at error level.
        if matches!(level, wit::Level::Error) && message.starts_with(PANIC_LOG_PREFIX) {
            self.panic_message = Some(message.to_string());
        }
        if let Some(capture) = &self.log_capture {
            let level = match level {
                wit::Level::Debug => "DEBUG",
                wit::Level::Info => "INFO",
                wit::Level::Warn => "WARN",
                wit::Level::Error => "ERROR",
            };
            capture.push(format!("{level} {message}"));
        }
        let (partition, version) = (self.partition, &*self.rule_version);
        match level {
            wit::Level::Debug => {
                tracing::debug!(target: "turnstile::rule", partition, version, "{message}")
            }
            wit::Level::Info => {
                tracing::info!(target: "turnstile::rule", partition, version, "{message}")
            }
            wit::Level::Warn => {
                tracing::warn!(target: "turnstile::rule", partition, version, "{message}")
            }
            wit::Level::Error => {
                tracing::error!(target: "turnstile::rule", partition, version, "{message}")
            }
        }
    }
}

impl wit::Host for HostState {}

impl Sandbox {
    /// Builds the engine (fuel, epochs, no async) and the linker, and starts the epoch ticker.
    pub fn new(limits: RuleLimits) -> anyhow::Result<Arc<Sandbox>> {
        Self::build(limits, None)
    }

    /// [`Sandbox::new`] that also collects every rule log line into the returned [`RuleLogs`].
    pub fn new_capturing_logs(limits: RuleLimits) -> anyhow::Result<(Arc<Sandbox>, RuleLogs)> {
        let logs = RuleLogs::default();
        Ok((Self::build(limits, Some(logs.clone()))?, logs))
    }

    fn build(limits: RuleLimits, log_capture: Option<RuleLogs>) -> anyhow::Result<Arc<Sandbox>> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            // Concurrency support costs ~35% per call and rules are synchronous.
            .concurrency_support(false)
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(512 * 1024);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        bindings::Rule::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let stop = ticker_stop.clone();
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })?;

        Ok(Arc::new(Sandbox {
            engine,
            linker,
            limits,
            ticker_stop,
            shared: Default::default(),
            log_capture,
        }))
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &RuleLimits {
        &self.limits
    }

    /// Checks and compiles a component. Never call this on a partition thread: compiling takes
    /// tens of milliseconds.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledRule, LoadError> {
        if bytes.len() > self.limits.max_module_bytes {
            return Err(LoadError::TooLarge {
                size: bytes.len(),
                max: self.limits.max_module_bytes,
            });
        }
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        // The header's layer field: 0 for core modules, 1 for components.
        if bytes[6..8] == [0, 0] {
            return Err(LoadError::CoreModule);
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;

        let component_type = component.component_type();
        let imports: Vec<String> = component_type
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let exports: Vec<String> = component_type
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let forbidden: Vec<String> = imports
            .iter()
            .filter(|name| !ALLOWED_IMPORTS.contains(&name.as_str()))
            .map(|name| format!("`{name}`"))
            .collect();
        if !forbidden.is_empty() {
            return Err(LoadError::ForbiddenImport(forbidden.join(", ")));
        }

        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let pre = bindings::RulePre::new(instance_pre)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        Ok(CompiledRule {
            version: version_id(bytes),
            size: bytes.len(),
            imports,
            exports,
            pre,
        })
    }

    /// [`Sandbox::compile`], remembered by version: the same bytes compile once per sandbox.
    pub fn compile_shared(&self, bytes: &[u8]) -> Result<Arc<CompiledRule>, LoadError> {
        let version = version_id(bytes);
        if let Some(rule) = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&version)
        {
            return Ok(rule.clone());
        }
        let rule = Arc::new(self.compile(bytes)?);
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(version, rule.clone());
        Ok(rule)
    }

    /// A fresh instance of `rule` in a fresh `Store`, for one partition's thread.
    pub fn instantiate(
        self: &Arc<Self>,
        rule: Arc<CompiledRule>,
        partition: u32,
    ) -> anyhow::Result<RuleInstance> {
        let (store, bindings) = self.new_store(&rule, partition)?;
        Ok(RuleInstance {
            sandbox: self.clone(),
            rule,
            partition,
            store,
            bindings,
        })
    }

    fn new_store(
        &self,
        rule: &CompiledRule,
        partition: u32,
    ) -> anyhow::Result<(Store<HostState>, bindings::Rule)> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                limiter: MemoryLimiter {
                    max_memory_bytes: self.limits.max_memory_bytes,
                    refused_growth: false,
                },
                partition,
                rule_version: short_version(&rule.version).into(),
                panic_message: None,
                log_capture: self.log_capture.clone(),
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_fuel(self.limits.fuel)?;
        store.set_epoch_deadline(self.deadline_ticks());
        store.epoch_deadline_trap();
        let bindings = rule.pre.instantiate(&mut store)?;
        Ok((store, bindings))
    }

    fn deadline_ticks(&self) -> u64 {
        (self.limits.deadline.as_micros() as u64).div_ceil(EPOCH_TICK.as_micros() as u64) + 1
    }
}

/// One partition's instance of a rule: its own `Store`, used only from that partition's thread.
pub struct RuleInstance {
    sandbox: Arc<Sandbox>,
    rule: Arc<CompiledRule>,
    partition: u32,
    store: Store<HostState>,
    bindings: bindings::Rule,
}

impl RuleInstance {
    /// The rule this instance runs.
    pub fn rule(&self) -> &Arc<CompiledRule> {
        &self.rule
    }

    /// Runs the rule for one request. On failure the `Store` and instance are replaced before
    /// this returns, so the next call starts clean.
    pub fn handle(
        &mut self,
        current: Option<&State>,
        request: &RoutedRequest,
    ) -> Result<Outcome, RuleFailure> {
        let limits = &self.sandbox.limits;
        // Both setters only fail when fuel/epochs are off, which `Sandbox::new` turns on.
        let _ = self.store.set_fuel(limits.fuel);
        self.store.data_mut().panic_message = None;
        self.store.set_epoch_deadline(self.sandbox.deadline_ticks());

        let current = current.map(|s| wit::State {
            status: s.status.clone(),
            user: s.user.clone(),
            data: s.data.clone(),
            version: s.version,
        });
        let wit_request = wit::Request {
            id: request.id.clone(),
            kind: request.kind.clone(),
            key: request.key.clone(),
            user: request.user.clone(),
            payload: request.payload.clone(),
            received_at_ms: request.received_at_ms,
        };
        let result = self
            .bindings
            .call_handle(&mut self.store, current.as_ref(), &wit_request);
        match result {
            Ok(outcome) => validate(outcome, limits.max_output_bytes),
            Err(error) => {
                let failure = self.classify(&error);
                self.replace_store();
                Err(failure)
            }
        }
    }

    /// Switches this instance to another rule: a fresh `Store` and instance of `rule`. On error
    /// the old rule stays.
    pub fn replace_rule(&mut self, rule: Arc<CompiledRule>) -> anyhow::Result<()> {
        let (store, bindings) = self.sandbox.new_store(&rule, self.partition)?;
        self.store = store;
        self.bindings = bindings;
        self.rule = rule;
        Ok(())
    }

    /// Fuel the last call used.
    pub fn fuel_used(&self) -> u64 {
        self.sandbox
            .limits
            .fuel
            .saturating_sub(self.store.get_fuel().unwrap_or(0))
    }

    fn classify(&self, error: &wasmtime::Error) -> RuleFailure {
        let trap = error.downcast_ref::<Trap>().copied();
        let kind = if self.store.data().limiter.refused_growth {
            FailureKind::Memory
        } else {
            match trap {
                Some(Trap::OutOfFuel) => FailureKind::FuelExhausted,
                Some(Trap::Interrupt) => FailureKind::Deadline,
                _ => FailureKind::Trap,
            }
        };
        let message = match kind {
            FailureKind::FuelExhausted => format!(
                "the rule used its whole fuel budget ({} units, rule.fuel)",
                self.sandbox.limits.fuel
            ),
            FailureKind::Deadline => format!(
                "the rule ran past its {} ms deadline (rule.deadline_ms)",
                self.sandbox.limits.deadline.as_millis()
            ),
            FailureKind::Memory => format!(
                "the rule tried to use more than {} bytes of memory (rule.max_memory_bytes)",
                self.sandbox.limits.max_memory_bytes
            ),
            _ => match &self.store.data().panic_message {
                Some(panic) => format!("the rule {panic} (then trapped: {error:#})"),
                None => format!("the rule trapped: {error:#}"),
            },
        };
        RuleFailure { kind, message }
    }

    /// Replaces the poisoned `Store` with a fresh one. If even that fails (it only can when the
    /// engine itself is broken) the old one stays and every later call fails loudly.
    fn replace_store(&mut self) {
        match self.sandbox.new_store(&self.rule, self.partition) {
            Ok((store, bindings)) => {
                self.store = store;
                self.bindings = bindings;
            }
            Err(e) => tracing::error!(
                partition = self.partition,
                "could not make a fresh rule instance after a failure: {e:#}"
            ),
        }
    }
}

/// Checks what a rule returned before anything of it is stored.
fn validate(outcome: wit::Outcome, max_output_bytes: usize) -> Result<Outcome, RuleFailure> {
    let output = |message: String| RuleFailure {
        kind: FailureKind::Output,
        message,
    };
    match outcome {
        wit::Outcome::Transition(t) => {
            if t.status.is_empty() {
                return Err(output("the rule returned an empty status".into()));
            }
            for (what, value) in [("status", &t.status), ("data", &t.data)] {
                if value.len() > max_output_bytes {
                    return Err(output(format!(
                        "the rule returned a {what} of {} bytes, more than the {max_output_bytes}-byte limit (rule.max_output_bytes)",
                        value.len()
                    )));
                }
            }
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&t.data) {
                return Err(output(format!(
                    "the rule returned data that is not JSON: {e}"
                )));
            }
            Ok(Outcome::Transition {
                status: t.status,
                data: t.data,
            })
        }
        wit::Outcome::Reject(reason) => {
            if reason.len() > max_output_bytes {
                return Err(output(format!(
                    "the rule returned a reject reason of {} bytes, more than the {max_output_bytes}-byte limit (rule.max_output_bytes)",
                    reason.len()
                )));
            }
            Ok(Outcome::Reject { reason })
        }
    }
}

/// The version id of a component: sha256 of its bytes, in hex.
pub fn version_id(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The first 12 hex digits of a version id, for logs and tables.
pub fn short_version(version: &str) -> &str {
    &version[..version.len().min(12)]
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
