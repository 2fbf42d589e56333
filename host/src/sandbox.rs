//! The sandbox: the wasmtime engine, the checks a rule component must pass to be loaded, the
//! limits every call runs under, and the one place that turns host values into WIT values.
//!
//! Only this module calls `bindgen!`. One [`Sandbox`] (one `Engine`, one `Linker`) serves the
//! process; a rule is compiled once into a [`CompiledRule`] (a pre-instantiated component shared
//! by all partitions, instantiated once at compile time so that a component that cannot start is
//! refused there), and each partition thread has its own [`RuleInstance`] of it, used from that
//! thread only.
//!
//! Isolation between requests ([`Isolation::PerCall`], the default): every call runs in a fresh
//! `Store` with a fresh instance, so nothing a rule keeps in globals or memory survives to the next
//! request; a rule is then a pure function of `(current state, request)`, which replay relies on.
//! wasmtime maps the component's initial memory image copy-on-write, so a fresh instance costs
//! microseconds (BENCHMARKS.md). [`Isolation::WarmInstanceLeaksState`] keeps one instance per
//! partition between calls: faster, but one request can see what an earlier one left behind.
//!
//! Limits per call: fuel (instructions), a deadline on the CPU time the call's thread spends
//! (checked at the ticks of an epoch ticker thread, so a call that the operating system
//! deschedules on a loaded machine is not failed for time it did not run), a cap on the instance's total linear memory and on its number of memories, tables and
//! instances, a cap on returned strings, and a rate limit on log lines. After any failure the
//! `Store` is dropped (wasmtime poisons a `Store` after a trap).
//!
//! Rules get `log` and a deterministic WASI 0.2 ([`wasi`]): clocks that read the request's
//! `received_at_ms`, random bytes seeded from the request id, stdout and stderr into `log`, no
//! environment, no files, no sockets, no HTTP. That is what JavaScript and Python components
//! import, and it keeps every rule a pure function of its inputs, which replay depends on. A
//! component that imports anything else is refused at load, with the imports and the offered
//! list named.

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

mod compile_cache;
mod wasi;

/// The reference rule (`guest/rules/reservation`), built into the binary by `build.rs`.
pub const REFERENCE_RULE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reservation.wasm"));

/// Wall-clock bound of a component's first instantiation at load, which also builds its memory
/// images (fuel still bounds its work as a call's).
const LOAD_INSTANTIATION_DEADLINE: Duration = Duration::from_secs(10);

/// How often the epoch ticker advances the engine's clock; the deadline's resolution.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// How the SDK's panic hook starts the error log line it sends before the rule traps.
const PANIC_LOG_PREFIX: &str = "panicked at";

/// Longest log line a rule may write; longer ones are cut, so a rule cannot flood the log.
pub const MAX_LOG_LINE: usize = 1024;

/// Longest failure message returned to API clients and written to the log: the kind and the
/// first line of what happened. The longer detail is kept (bounded) in the dead letter only.
pub const MAX_FAILURE_MESSAGE: usize = 256;

/// Most linear memories one rule instance may have (all its core instances together).
pub const MAX_MEMORIES: usize = 4;

/// Most tables one rule instance may have.
pub const MAX_TABLES: usize = 16;

/// Most elements of one table.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Most core instances inside one rule component.
pub const MAX_INSTANCES: usize = 16;

/// Rule log lines dropped by the per-partition rate limit, since start (all partitions).
pub static RULE_LOG_LINES_DROPPED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Imports a rule component may have besides WASI ([`wasi::INTERFACES`]): the world's `log`
/// function, and the instance of types the world `use`s (it carries no functions).
const ALLOWED_IMPORTS: &[&str] = &["log", "turnstile:rule/types@0.1.0"];

/// The limits one rule call runs under.
#[derive(Debug, Clone)]
pub struct RuleLimits {
    /// Fuel given to each call.
    pub fuel: u64,
    /// CPU-time limit of each call (the partition thread's, see [`CallDeadline`]).
    pub deadline: Duration,
    /// Linear-memory cap per instance, in bytes.
    pub max_memory_bytes: usize,
    /// Largest component accepted, in bytes.
    pub max_module_bytes: usize,
    /// Most functions in all the component's core modules together.
    pub max_functions: u64,
    /// Largest string a rule may return, in bytes.
    pub max_output_bytes: usize,
    /// Largest failure detail kept in a dead letter, in bytes.
    pub max_failure_detail_bytes: usize,
    /// Rule log lines each partition may write per second; the rest are dropped and counted.
    pub max_log_lines_per_second: u32,
    /// Whether each call gets a fresh instance.
    pub isolation: Isolation,
    /// Guard pages and Spectre-hardened bounds checks instead of plain explicit bounds checks.
    pub spectre_hardening: bool,
    /// The failure budget per key, applied by the partition engine.
    pub breaker: crate::breaker::BreakerSettings,
    /// Longest a component may take to compile.
    pub compile_budget: Duration,
    /// Compiled versions a rule registry keeps besides the running ones.
    pub max_idle_compiled_versions: usize,
}

impl From<&RuleConfig> for RuleLimits {
    fn from(c: &RuleConfig) -> Self {
        RuleLimits {
            fuel: c.fuel,
            deadline: Duration::from_millis(c.deadline_ms),
            max_memory_bytes: c.max_memory_bytes,
            max_module_bytes: c.max_module_bytes,
            max_functions: c.max_functions,
            max_output_bytes: c.max_output_bytes,
            max_failure_detail_bytes: c.max_failure_detail_bytes,
            max_log_lines_per_second: c.max_log_lines_per_second,
            isolation: c.isolation,
            spectre_hardening: c.spectre_hardening,
            compile_budget: Duration::from_millis(c.max_compile_ms),
            max_idle_compiled_versions: c.max_idle_compiled_versions,
            breaker: crate::breaker::BreakerSettings {
                failures: c.breaker_failures,
                window_ms: c.breaker_window_ms,
                cooldown_ms: c.breaker_cooldown_ms,
            },
        }
    }
}

/// What a rule call may see of earlier calls (`rule.isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Every call starts from the component's initial state: a fresh instance per call.
    #[default]
    PerCall,
    /// One instance per partition kept between calls (replaced after a failure): globals and
    /// memory written by one request are visible to the next, so one user's data can leak into
    /// another user's answer and replay may disagree with the log. Opt-in, for speed only.
    WarmInstanceLeaksState,
}

impl Isolation {
    /// The configuration value.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::PerCall => "per_call",
            Isolation::WarmInstanceLeaksState => "warm_instance_leaks_state",
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
    /// More functions than `rule.max_functions`: compile time and memory grow with the function
    /// count, not with the file size, so the size limit alone does not bound them.
    #[error(
        "the component has {count} functions, more than the {max}-function limit (rule.max_functions)"
    )]
    TooManyFunctions {
        /// Its functions.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A core module, not a component.
    #[error(
        "a core WebAssembly module, not a component; build rules with `turnstile build`, which wraps the module into a component"
    )]
    CoreModule,
    /// wasmtime could not compile it.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// Compiling took longer than `rule.max_compile_ms`.
    #[error(
        "compiling the component took more than {budget_ms} ms (rule.max_compile_ms); it has too much code"
    )]
    CompileTimeout {
        /// The budget.
        budget_ms: u64,
    },
    /// It compiles, but an instance of it cannot start within the limits (initial memory over
    /// the cap, too many memories or tables, a start function that traps or runs out of fuel).
    #[error("the component cannot be instantiated within the limits: {0}")]
    Instantiation(String),
    /// It imports something the host does not offer (sockets, HTTP, any other interface).
    #[error(
        "the component imports {imports}, which rules may not use; rules may import only `log` and these WASI 0.2 interfaces: {offered}"
    )]
    ForbiddenImport {
        /// The refused imports, each in backquotes.
        imports: String,
        /// What the host offers, for the author to compare.
        offered: String,
    },
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
    /// The rule ran past its deadline.
    Deadline,
    /// The rule tried to grow its memory past the cap.
    Memory,
    /// The rule returned something the host refuses (empty status, invalid JSON, too long).
    Output,
    /// The rule called WASI `exit` (a Python `sys.exit`, a JavaScript `process.exit`) instead of
    /// returning an outcome.
    Exit,
}

impl FailureKind {
    /// Every kind, in a fixed order (for counters).
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Trap,
        FailureKind::FuelExhausted,
        FailureKind::Deadline,
        FailureKind::Memory,
        FailureKind::Output,
        FailureKind::Exit,
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
            FailureKind::Exit => "rule_exit",
        }
    }
}

/// A failed rule call.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct RuleFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, for API clients and the log: short (at most [`MAX_FAILURE_MESSAGE`]
    /// bytes), one line, escaped, and the same for the same kind of failure.
    pub message: String,
    /// The longer detail (a trap's full text), escaped and cut to
    /// `rule.max_failure_detail_bytes`: kept in the dead letter, never sent to API clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl RuleFailure {
    /// A failure with only a short message.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> RuleFailure {
        RuleFailure {
            kind,
            message: message.into(),
            detail: None,
        }
    }
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
    /// Where rule log lines are also collected, for `turnstile test` to show them per step;
    /// `None` in the server.
    log_capture: Option<RuleLogs>,
    /// Held by the thread compiling a component: one compilation at a time, so components
    /// refused for their compile time (whose compilation cannot be stopped and runs on) never
    /// pile up.
    compile_gate: Arc<std::sync::Mutex<()>>,
    /// Compiled components kept on disk between processes ([`compile_cache`]); `None` when
    /// turned off.
    compile_cache: Option<compile_cache::CompileCache>,
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
    /// Functions defined in its core modules.
    pub functions: u64,
    /// Names of the component's imports.
    pub imports: Vec<String>,
    /// Names of the component's exports.
    pub exports: Vec<String>,
    /// Whether it imports any WASI: only then does a call set up the WASI clock and random
    /// bytes, so a rule importing only `log` pays nothing for them.
    uses_wasi: bool,
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
    /// The partition's log rate limit, shared by every `Store` the partition makes.
    log_budget: Arc<std::sync::Mutex<LogBudget>>,
    /// The panic message the SDK's panic hook logged during the current call: a panic ends in
    /// a bare `unreachable` trap, so this is the only place its reason survives.
    panic_message: Option<String>,
    /// The sandbox's log capture, if it has one.
    log_capture: Option<RuleLogs>,
    /// What WASI sees of the current call (its clock, random bytes, unfinished output lines).
    wasi: wasi::WasiCall,
    /// The current call's (or instantiation's) deadline.
    deadline: CallDeadline,
}

/// A call's deadline in CPU time of the thread that runs it. The epoch ticker only says when to
/// look: when the epoch deadline comes, the thread's CPU time since the call began is read, and
/// the call is interrupted only if that reached the limit; otherwise the epoch deadline moves to
/// when the rest of the limit could at the earliest be used up. A wall-clock deadline failed
/// correct rules on a loaded machine (a 100 ms limit, a descheduled thread, the test suite on 2
/// busy cores), while the rule's own work was a fraction of it. Nothing a rule can call blocks
/// (every WASI pollable is ready at once, no I/O), so a call's wall time is its CPU time plus
/// time descheduled.
///
/// Reading a thread's CPU clock is a system call, too dear for every call of a rule that runs
/// for microseconds. So a call notes only its wall-clock start, and its first epoch deadline is
/// the next tick (at most 2 ms away, never reached by most calls): there the CPU clock is read
/// for the first time, and the call is charged its wall time so far but at most two ticks;
/// from then on, only CPU time counts. Running Wasm notices a tick within microseconds (epochs
/// are checked at every function entry and loop), so a first look later than that means the
/// thread was descheduled, or in a host call, which hostcall fuel bounds.
#[derive(Clone, Copy)]
struct CallDeadline {
    /// CPU time allowed.
    limit: Duration,
    /// When the call began.
    started_at: std::time::Instant,
    /// From the first look on: the thread's CPU clock then, and what the call had used by then
    /// (its wall time: an upper bound).
    mark: Option<(Duration, Duration)>,
}

impl CallDeadline {
    /// A deadline of `limit` starting now, on the current thread.
    fn start(limit: Duration) -> CallDeadline {
        CallDeadline {
            limit,
            started_at: std::time::Instant::now(),
            mark: None,
        }
    }

    /// The epoch deadline to set when the call begins: the next tick.
    const FIRST_LOOK: u64 = 1;

    /// What the epoch deadline callback answers: interrupt once the limit is used up, else
    /// look again when it could be.
    fn check(&mut self) -> wasmtime::UpdateDeadline {
        let used = match (self.mark, thread_cpu_now()) {
            (Some((cpu_then, used_then)), Some(cpu_now)) => {
                used_then + cpu_now.saturating_sub(cpu_then)
            }
            (None, Some(cpu_now)) => {
                let used = self.started_at.elapsed().min(EPOCH_TICK * 2);
                self.mark = Some((cpu_now, used));
                used
            }
            // No thread CPU clock here: the wall clock counts.
            (_, None) => self.started_at.elapsed(),
        };
        match self.limit.checked_sub(used) {
            Some(left) if !left.is_zero() => wasmtime::UpdateDeadline::Continue(epoch_ticks(left)),
            _ => wasmtime::UpdateDeadline::Interrupt,
        }
    }
}

/// The calling thread's CPU time (user + system), or `None` where it cannot be read.
fn thread_cpu_now() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    #[allow(unsafe_code)]
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (read == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

/// Epoch ticks covering `d` (at least one).
fn epoch_ticks(d: Duration) -> u64 {
    (d.as_micros() as u64)
        .div_ceil(EPOCH_TICK.as_micros() as u64)
        .max(1)
}

/// Caps the instance's linear memory (all its memories together) and remembers whether it
/// refused a growth, so a memory bomb is reported as `rule_memory` and not as the `unreachable` a
/// failed allocation turns into.
struct MemoryLimiter {
    max_memory_bytes: usize,
    /// Bytes of all the instance's memories so far: the cap is per instance, not per memory,
    /// or four memories would cost four times the cap.
    total_bytes: usize,
    refused_growth: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // wasmtime also asks with `current = 0` when it creates a memory, so the sum covers
        // initial sizes as well as growth.
        let total = self
            .total_bytes
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.max_memory_bytes {
            self.refused_growth = true;
            wasmtime::bail!(
                "memory limit: the rule asked for {total} bytes in all, the cap is {}",
                self.max_memory_bytes
            );
        }
        self.total_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// A token bucket of log lines per partition: a rule that logs in a loop gets its first lines
/// through and the rest counted, instead of writing gigabytes.
struct LogBudget {
    per_second: u32,
    tokens: f64,
    refilled_at: std::time::Instant,
    /// Lines dropped since the last report line, so the operator sees that some are missing.
    dropped: u64,
}

impl LogBudget {
    fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            tokens: f64::from(per_second),
            refilled_at: std::time::Instant::now(),
            dropped: 0,
        }
    }

    /// Whether a line may be written now; also returns the count of lines dropped before it,
    /// once, so it can be reported with the line that is let through.
    fn take(&mut self) -> (bool, u64) {
        let now = std::time::Instant::now();
        let burst = f64::from(self.per_second);
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * burst).min(burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            (true, std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            RULE_LOG_LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
            (false, 0)
        }
    }
}

impl bindings::RuleImports for HostState {
    fn log(&mut self, level: wit::Level, message: String) {
        // Before the rate limit: the reason of a panic must survive a rule that also logs a lot.
        // The SDK's panic hook logs `panicked at <file:line:col>: <message>` at error level.
        if matches!(level, wit::Level::Error) && message.starts_with(PANIC_LOG_PREFIX) {
            self.panic_message = Some(escape_untrusted(&message, MAX_LOG_LINE));
        }
        if let Some(capture) = &self.log_capture {
            let name = match level {
                wit::Level::Debug => "DEBUG",
                wit::Level::Info => "INFO",
                wit::Level::Warn => "WARN",
                wit::Level::Error => "ERROR",
            };
            capture.push(format!(
                "{name} {}",
                escape_untrusted(&message, MAX_LOG_LINE)
            ));
        }
        let (allowed, dropped_before) = self
            .log_budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if !allowed {
            return;
        }
        let (partition, version) = (self.partition, &*self.rule_version);
        if dropped_before > 0 {
            tracing::warn!(
                target: "turnstile::rule",
                partition,
                version,
                dropped = dropped_before,
                "rule log lines dropped by the rate limit (rule.max_log_lines_per_second)"
            );
        }
        let message = escape_untrusted(&message, MAX_LOG_LINE);
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
            // A trap's backtrace carries the module's function names, which a hostile rule
            // makes megabytes long; the failure kind and first line are all we report.
            .wasm_backtrace_max_frames(None)
            // Explicit, because per-call isolation depends on it: a fresh instance maps the
            // initial memory image copy-on-write instead of copying data segments.
            .memory_init_cow(true)
            // One compiling thread: a big component being checked during a hot reload must leave
            // the other cores to the partition threads.
            .parallel_compilation(false)
            .max_wasm_stack(512 * 1024);
        if !limits.spectre_hardening {
            // Per-call isolation makes an instance per request. With guard pages, each one costs
            // two `mprotect`s (the slot's accessible size is cut back to the initial size at
            // instantiation, and raised again when the rule's allocator grows memory), and each
            // `mprotect` takes the process's memory-map lock and flushes the TLB of every core
            // running a partition thread: measured 2.2x the full path's throughput without them
            // (BENCHMARKS.md). Explicit bounds checks (no guard region, no signal handlers) keep a
            // slot's pages accessible, so a per-call instance makes no system call. wasmtime then
            // compiles bounds checks without its Spectre mitigation: a rule has no clock, no
            // threads and no I/O to time a speculative read with; `rule.spectre_hardening` turns
            // the mitigation (and the cost) back on.
            config.signals_based_traps(false).memory_guard_size(0);
        }
        let engine = match Engine::new(config.clone().allocation_strategy(pool(&limits))) {
            Ok(engine) => engine,
            Err(e) => {
                // The pool reserves address space up front; where that is refused (a low
                // `ulimit -v`), instances are allocated one by one instead: slower, same limits.
                tracing::warn!(
                    "the pooling instance allocator is unavailable ({e:#}); instances are allocated on demand, which makes each call slower"
                );
                Engine::new(&config)?
            }
        };
        let mut linker = Linker::new(&engine);
        bindings::Rule::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
        wasi::add_to_linker(&mut linker)?;

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
            compile_gate: Default::default(),
            compile_cache: compile_cache::CompileCache::from_env(),
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
        let functions = count_functions(bytes)?;
        if functions > self.limits.max_functions {
            return Err(LoadError::TooManyFunctions {
                count: functions,
                max: self.limits.max_functions,
            });
        }
        let component = self.compile_within_budget(bytes)?;

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
            .filter(|name| !ALLOWED_IMPORTS.contains(&name.as_str()) && !wasi::is_provided(name))
            .map(|name| format!("`{name}`"))
            .collect();
        if !forbidden.is_empty() {
            return Err(LoadError::ForbiddenImport {
                imports: forbidden.join(", "),
                offered: wasi::INTERFACES.join(", "),
            });
        }
        let uses_wasi = imports.iter().any(|name| wasi::is_provided(name));

        // A component importing `wasi:sockets` gets its own copy of the linker, with the
        // sockets it imports linked to functions that trap.
        let no_network_linker;
        let linker = if imports.iter().any(|name| name.starts_with("wasi:sockets/")) {
            let mut linker = self.linker.clone();
            wasi::link_no_network(&mut linker, &self.engine, &component)
                .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
            no_network_linker = linker;
            &no_network_linker
        } else {
            &self.linker
        };
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let pre = bindings::RulePre::new(instance_pre)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let rule = CompiledRule {
            version: version_id(bytes),
            size: bytes.len(),
            functions,
            imports,
            exports,
            uses_wasi,
            pre,
        };
        // Instantiate once, under the same limits as every call, so that whatever checks a
        // component (`check`, `build`, `test`, `run`, an install) refuses one that could never
        // start, before anything of it is saved or swapped in.
        let budget = Arc::new(std::sync::Mutex::new(LogBudget::new(
            self.limits.max_log_lines_per_second,
        )));
        // The first instantiation of a component also builds its copy-on-write memory images
        // (tens of MB for an interpreter such as CPython): it gets a generous deadline (its fuel
        // is the call's). The second is a call's instantiation and must fit a call's limits.
        let first = LOAD_INSTANTIATION_DEADLINE.max(self.limits.deadline);
        for deadline in [first, self.limits.deadline] {
            if let Err(e) = self.new_store(&rule, u32::MAX, &budget, deadline) {
                let text = escape_untrusted(&format!("{e:#}"), MAX_FAILURE_MESSAGE);
                return Err(LoadError::Instantiation(text));
            }
        }
        Ok(rule)
    }

    /// Compiles on a thread of its own and waits at most `rule.max_compile_ms` for it. A
    /// component over the budget is refused at once; its compilation cannot be interrupted, so
    /// it finishes in the background (holding the compile gate) and is thrown away.
    ///
    /// The budget is CPU time of the compiling thread (compilation is single-threaded), read
    /// from `/proc`, so a busy machine does not refuse a component a quiet one accepts; where
    /// `/proc` cannot say, wall-clock time counts. Waiting for an earlier compilation to finish
    /// is bounded too, by [`COMPILE_WAIT_FACTOR`] times the budget of wall-clock time.
    ///
    /// A component found in the compile cache is not compiled again, but the CPU time its
    /// compilation took is held to the budget all the same, so the cache never lets through a
    /// component a cold start would refuse.
    fn compile_within_budget(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        let budget = self.limits.compile_budget;
        if let Some(cached) = self
            .compile_cache
            .as_ref()
            .and_then(|cache| cache.load(&self.engine, bytes))
        {
            if cached.compile_cpu > budget {
                return Err(LoadError::CompileTimeout {
                    budget_ms: budget.as_millis() as u64,
                });
            }
            return Ok(cached.component);
        }
        let (component, compile_cpu) = self.compile_on_thread(bytes)?;
        if let Some(cache) = &self.compile_cache {
            cache.store(&self.engine, bytes, &component, compile_cpu);
        }
        Ok(component)
    }

    /// Compiles `bytes` on a thread of its own under the budget (see
    /// [`Sandbox::compile_within_budget`]); the component and the CPU time it took.
    fn compile_on_thread(&self, bytes: &[u8]) -> Result<(Component, Duration), LoadError> {
        use std::sync::mpsc::RecvTimeoutError;
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let (started, compiler) = std::sync::mpsc::sync_channel(1);
        let engine = self.engine.clone();
        let gate = self.compile_gate.clone();
        let bytes = bytes.to_vec();
        std::thread::Builder::new()
            .name("rule-compile".into())
            .spawn(move || {
                let _one_at_a_time = gate.lock().unwrap_or_else(|e| e.into_inner());
                // `PID/task/TID`: where /proc keeps this thread's CPU time.
                let task = std::fs::read_link("/proc/thread-self").ok();
                let _ = started.send(task.clone());
                let began = std::time::Instant::now();
                let compiled = Component::new(&engine, &bytes).map(|component| {
                    let cpu = task.as_deref().and_then(thread_cpu_time);
                    (component, cpu.unwrap_or_else(|| began.elapsed()))
                });
                let _ = done.send(compiled);
            })
            .map_err(|e| LoadError::Invalid(format!("starting a compiler thread: {e}")))?;
        let budget = self.limits.compile_budget;
        let refused = || LoadError::CompileTimeout {
            budget_ms: budget.as_millis() as u64,
        };
        let waited = std::time::Instant::now();
        let mut thread = None;
        loop {
            match result.recv_timeout(COMPILE_POLL) {
                Ok(Ok((_, cpu))) if cpu > budget => {
                    // Finished between two looks, but over the budget all the same: refused as
                    // a compile cache entry of the same cost would be.
                    return Err(refused());
                }
                Ok(compiled) => {
                    return compiled.map_err(|e| LoadError::Invalid(format!("{e:#}")));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(LoadError::Invalid(
                        "the compiler thread stopped without an answer".into(),
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if thread.is_none() {
                thread = compiler.try_recv().ok();
            }
            let spent = match &thread {
                Some(Some(task)) => thread_cpu_time(task).unwrap_or_else(|| waited.elapsed()),
                Some(None) => waited.elapsed(),
                // Still waiting for an earlier compilation to finish.
                None => Duration::ZERO,
            };
            if spent > budget || waited.elapsed() > budget * COMPILE_WAIT_FACTOR {
                return Err(refused());
            }
        }
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

    /// The instance `partition`'s thread runs `rule` with. Under [`Isolation::PerCall`] it holds
    /// no `Store` between calls; under the warm mode it makes its instance now.
    pub fn instantiate(
        self: &Arc<Self>,
        rule: Arc<CompiledRule>,
        partition: u32,
    ) -> anyhow::Result<RuleInstance> {
        let mut instance = RuleInstance {
            sandbox: self.clone(),
            rule,
            partition,
            warm: None,
            log_budget: Arc::new(std::sync::Mutex::new(LogBudget::new(
                self.limits.max_log_lines_per_second,
            ))),
            last_fuel_used: 0,
        };
        if self.limits.isolation == Isolation::WarmInstanceLeaksState {
            instance.warm = Some(self.new_store(
                &instance.rule,
                partition,
                &instance.log_budget,
                self.limits.deadline,
            )?);
        }
        Ok(instance)
    }

    fn new_store(
        &self,
        rule: &CompiledRule,
        partition: u32,
        log_budget: &Arc<std::sync::Mutex<LogBudget>>,
        deadline: Duration,
    ) -> anyhow::Result<(Store<HostState>, bindings::Rule)> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                limiter: MemoryLimiter {
                    max_memory_bytes: self.limits.max_memory_bytes,
                    total_bytes: 0,
                    refused_growth: false,
                },
                partition,
                rule_version: short_version(&rule.version).into(),
                log_budget: log_budget.clone(),
                panic_message: None,
                log_capture: self.log_capture.clone(),
                wasi: Default::default(),
                deadline: CallDeadline::start(deadline),
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(hostcall_budget(&self.limits));
        // A start function runs during instantiation: it gets the same fuel and deadline as a
        // call, so one that loops is stopped here too.
        store.set_fuel(self.limits.fuel)?;
        store.set_epoch_deadline(CallDeadline::FIRST_LOOK);
        store.epoch_deadline_callback(|mut store| Ok(store.data_mut().deadline.check()));
        let bindings = rule.pre.instantiate(&mut store)?;
        Ok((store, bindings))
    }
}

/// How often a compilation's CPU time is looked at.
const COMPILE_POLL: Duration = Duration::from_millis(50);

/// Wall-clock time a compilation may take, waiting for an earlier one included, in multiples of
/// `rule.max_compile_ms` (its CPU time is held to the budget itself).
const COMPILE_WAIT_FACTOR: u32 = 10;

/// CPU time a thread has used, from `/proc/<task>/stat` (`task` is `PID/task/TID`), or none where
/// it cannot be read.
fn thread_cpu_time(task: &std::path::Path) -> Option<Duration> {
    let stat =
        std::fs::read_to_string(std::path::Path::new("/proc").join(task).join("stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces): state is the
    // first, utime and stime (in clock ticks) the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI.
    Some(Duration::from_millis(ticks * 10))
}

/// Slots of the instance pool: instances alive at once in one process's sandbox (a per-call
/// instance lives for one call; the warm mode keeps one per partition).
const POOL_INSTANCES: u32 = 1000;

/// Dirty bytes of a freed slot reset in place (kept resident) rather than given back to the OS.
const POOL_KEEP_RESIDENT_BYTES: usize = 1024 * 1024;

/// The pooling allocator: pre-reserved slots for instances, memories and tables, reused from
/// call to call (a slot is reset to the component's initial image when it is freed), sized by
/// the same limits the [`MemoryLimiter`] enforces.
fn pool(limits: &RuleLimits) -> wasmtime::PoolingAllocationConfig {
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * MAX_INSTANCES as u32)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 2)
        .max_core_instances_per_component(MAX_INSTANCES as u32)
        .max_memories_per_component(MAX_MEMORIES as u32)
        .max_memories_per_module(MAX_MEMORIES as u32)
        .max_tables_per_component(MAX_TABLES as u32)
        .max_tables_per_module(MAX_TABLES as u32)
        .table_elements(MAX_TABLE_ELEMENTS)
        .max_memory_size(limits.max_memory_bytes)
        // A freed slot is reset by copying back only the pages the call dirtied (found with
        // Linux's PAGEMAP_SCAN, kernel 6.7+; elsewhere this is ignored) instead of `madvise`
        // and faulting every touched page in again on the next call.
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(POOL_KEEP_RESIDENT_BYTES)
        .table_keep_resident(POOL_KEEP_RESIDENT_BYTES);
    pool
}

/// One partition's instance of a rule, used only from that partition's thread.
pub struct RuleInstance {
    sandbox: Arc<Sandbox>,
    rule: Arc<CompiledRule>,
    partition: u32,
    /// The `Store` and instance kept between calls, under [`Isolation::WarmInstanceLeaksState`]
    /// only; `None` means the next call makes a fresh one.
    warm: Option<(Store<HostState>, bindings::Rule)>,
    /// The partition's log rate limit: it outlives the per-call `Store`s.
    log_budget: Arc<std::sync::Mutex<LogBudget>>,
    /// Fuel of the last call, read before its `Store` is dropped (a failed call that burned its
    /// whole budget counts it all).
    last_fuel_used: u64,
}

impl RuleInstance {
    /// The rule this instance runs.
    pub fn rule(&self) -> &Arc<CompiledRule> {
        &self.rule
    }

    /// Runs the rule for one request, in a fresh instance unless the warm mode is on. After a
    /// failure nothing of the failed instance is kept.
    pub fn handle(
        &mut self,
        current: Option<&State>,
        request: &RoutedRequest,
    ) -> Result<Outcome, RuleFailure> {
        let sandbox = self.sandbox.clone();
        let limits = &sandbox.limits;
        let (mut store, bindings) = match self.warm.take() {
            Some(warm) => warm,
            None => sandbox
                .new_store(
                    &self.rule,
                    self.partition,
                    &self.log_budget,
                    limits.deadline,
                )
                .map_err(|e| {
                    self.last_fuel_used = 0;
                    failure_with_detail(
                        FailureKind::Trap,
                        "the rule could not be instantiated".into(),
                        &format!("{e:#}"),
                        limits.max_failure_detail_bytes,
                    )
                })?,
        };

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
        // Set last, so that neither instantiation nor copying the arguments counts against the
        // call's budget. Both setters only fail when fuel/epochs are off, which `Sandbox::new`
        // turns on.
        let _ = store.set_fuel(limits.fuel);
        store.data_mut().panic_message = None;
        store.data_mut().deadline = CallDeadline::start(limits.deadline);
        store.set_epoch_deadline(CallDeadline::FIRST_LOOK);
        if self.rule.uses_wasi {
            store
                .data_mut()
                .wasi
                .begin(request.received_at_ms, &request.id);
        }
        let result = bindings.call_handle(&mut store, current.as_ref(), &wit_request);
        if self.rule.uses_wasi {
            store.data_mut().end_wasi_call();
        }
        self.last_fuel_used = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let decided = match result {
            Ok(outcome) => validate(outcome, limits.max_output_bytes),
            Err(error) => Err(classify(&sandbox, &store, &error)),
        };
        // Only a warm instance that just succeeded is kept; any failure (a `rule_output` one
        // too) drops it, and per-call isolation drops every instance.
        if decided.is_ok() && limits.isolation == Isolation::WarmInstanceLeaksState {
            self.warm = Some((store, bindings));
        }
        decided
    }

    /// Switches this instance to another rule. Under the warm mode it makes the new instance
    /// now; on error the old rule stays.
    pub fn replace_rule(&mut self, rule: Arc<CompiledRule>) -> anyhow::Result<()> {
        if self.sandbox.limits.isolation == Isolation::WarmInstanceLeaksState {
            self.warm = Some(self.sandbox.new_store(
                &rule,
                self.partition,
                &self.log_budget,
                self.sandbox.limits.deadline,
            )?);
        } else {
            self.warm = None;
        }
        self.rule = rule;
        Ok(())
    }

    /// Fuel the last call used.
    pub fn fuel_used(&self) -> u64 {
        self.last_fuel_used
    }
}

/// Most bytes of strings a rule may hand the host in one crossing (the outcome of a call, or one
/// `log` call): room for a status and data of `max_output_bytes` each. wasmtime counts the
/// bytes before copying them and refuses more (as hostcall fuel), so an oversize output is
/// refused without being copied; what is within it is copied, then checked string by string.
fn hostcall_budget(limits: &RuleLimits) -> usize {
    limits
        .max_output_bytes
        .saturating_mul(2)
        .saturating_add(1024)
}

fn classify(sandbox: &Sandbox, store: &Store<HostState>, error: &wasmtime::Error) -> RuleFailure {
    let limits = &sandbox.limits;
    if let Some(status) = store.data().wasi.exit_status {
        return RuleFailure::new(
            FailureKind::Exit,
            format!("the rule called exit with status {status} instead of returning an outcome"),
        );
    }
    if let Some(refusal) = &store.data().wasi.refusal {
        return failure_with_detail(
            FailureKind::Trap,
            refusal.clone(),
            &format!("{error:#}"),
            limits.max_failure_detail_bytes,
        );
    }
    let trap = error.downcast_ref::<Trap>().copied();
    let kind = if store.data().limiter.refused_growth {
        FailureKind::Memory
    } else {
        match trap {
            Some(Trap::OutOfFuel) => FailureKind::FuelExhausted,
            Some(Trap::Interrupt) => FailureKind::Deadline,
            // No trap: the call ran, but what the rule handed the host could not be read (over
            // the hostcall budget, not UTF-8, out of bounds): the rule's output is at fault.
            None if store.data().panic_message.is_none() => FailureKind::Output,
            _ => FailureKind::Trap,
        }
    };
    match kind {
        FailureKind::FuelExhausted => RuleFailure::new(
            kind,
            format!(
                "the rule used its whole fuel budget ({} units, rule.fuel)",
                limits.fuel
            ),
        ),
        FailureKind::Deadline => RuleFailure::new(
            kind,
            format!(
                "the rule ran past its {} ms deadline (rule.deadline_ms)",
                limits.deadline.as_millis()
            ),
        ),
        FailureKind::Memory => RuleFailure::new(
            kind,
            format!(
                "the rule tried to use more than {} bytes of memory (rule.max_memory_bytes)",
                limits.max_memory_bytes
            ),
        ),
        FailureKind::Output => failure_with_detail(
            kind,
            format!(
                "the rule handed the host more than {} bytes at once (rule.max_output_bytes, twice over) or a value it cannot read",
                hostcall_budget(limits)
            ),
            &format!("{error:#}"),
            limits.max_failure_detail_bytes,
        ),
        _ => {
            // The trap code is wasmtime's own text; anything else (a host error's chain) may
            // carry rule-controlled names, so it goes to the detail only.
            // A panic's own message (escaped, bounded) says why; it is the rule's text, but
            // the one a rule author needs to see, in the answer, the dead letter and the log.
            // A JavaScript or Python exception is printed to stderr before the interpreter
            // traps: its last line (`ValueError: boom`) is that rule's panic message.
            let first = match (
                &store.data().panic_message,
                &store.data().wasi.last_error_line,
                trap,
            ) {
                (Some(panic), _, _) => format!("the rule {panic}"),
                (None, Some(line), Some(trap)) => {
                    format!("the rule trapped after writing to stderr: {line} ({trap})")
                }
                (None, Some(line), None) => {
                    format!("the rule trapped after writing to stderr: {line}")
                }
                (None, None, Some(trap)) => format!("the rule trapped: {trap}"),
                (None, None, None) => "the rule trapped".to_string(),
            };
            failure_with_detail(
                kind,
                first,
                &format!("{error:#}"),
                limits.max_failure_detail_bytes,
            )
        }
    }
}

/// A failure whose message is `first` (cut to one short line) and whose detail is `detail`
/// escaped and cut to `max_detail` bytes.
fn failure_with_detail(
    kind: FailureKind,
    first: String,
    detail: &str,
    max_detail: usize,
) -> RuleFailure {
    let first_line = first.lines().next().unwrap_or_default();
    RuleFailure {
        kind,
        message: escape_untrusted(first_line, MAX_FAILURE_MESSAGE),
        detail: Some(escape_untrusted(detail, max_detail)),
    }
}

/// Checks what a rule returned before anything of it is stored.
fn validate(outcome: wit::Outcome, max_output_bytes: usize) -> Result<Outcome, RuleFailure> {
    let output = |message: String| RuleFailure::new(FailureKind::Output, message);
    match outcome {
        wit::Outcome::Transition(t) => {
            if t.status.trim().is_empty() {
                return Err(output("the rule returned an empty status".into()));
            }
            if t.status.chars().any(is_unsafe_char) {
                return Err(output(
                    "the rule returned a status with control or bidi characters".into(),
                ));
            }
            for (what, value) in [("status", &t.status), ("data", &t.data)] {
                if value.len() > max_output_bytes {
                    return Err(output(format!(
                        "the rule returned a {what} of {} bytes, more than the {max_output_bytes}-byte limit (rule.max_output_bytes)",
                        value.len()
                    )));
                }
            }
            // Parsed into a value, not skipped: skipping accepts numbers no JSON reader can hold
            // (`1e999999`) and lone surrogate escapes, which would be stored and served back
            // as something else.
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&t.data) {
                // serde_json's message quotes no input, only a position: safe to return.
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

/// Functions defined in all the core modules of a component, counted from the section headers
/// without compiling anything.
fn count_functions(bytes: &[u8]) -> Result<u64, LoadError> {
    let mut functions = 0u64;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| LoadError::Invalid(e.to_string()))?;
        if let wasmparser::Payload::FunctionSection(section) = payload {
            functions += u64::from(section.count());
        }
    }
    Ok(functions)
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

/// Whether a character could forge or disguise a log line or terminal output: control
/// characters (LF, CR, ESC...) and the Unicode bidi controls (U+202E and friends).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{061c}')
}

/// A rule-controlled string made safe to log, store or print: unsafe characters become `\u{..}`
/// escapes, and the result is cut to at most `max` bytes (an ellipsis marks the cut). Only the
/// first `max` bytes of the input are looked at, so a huge input costs no more than a small one.
pub fn escape_untrusted(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let piece_len = if is_unsafe_char(c) { 10 } else { c.len_utf8() };
        if out.len() + piece_len > max {
            if max >= 3 {
                while out.len() + 3 > max {
                    out.pop();
                }
                out.push_str("...");
            }
            return out;
        }
        if is_unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}
