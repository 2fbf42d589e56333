//! The deterministic WASI 0.2 a rule gets: what `componentize-js` and `componentize-py`
//! components import, implemented so that a rule stays a pure function of `(current state,
//! request)` and replay gives the same outcomes.
//!
//! - Wall clock and monotonic clock read the request's `received_at_ms`; time does not move
//!   during a call. Every pollable (a timer, a stream) is ready at once, so a rule that sleeps
//!   goes on immediately instead of waiting.
//! - Random bytes (`random`, `insecure`, `insecure-seed`) come from SHA-256 in counter mode,
//!   seeded from the request id: the same request draws the same bytes, on replay too. They are
//!   not secret (anyone who knows the request id can compute them).
//! - Environment and arguments are empty, there is no working directory, stdin is at its end,
//!   there is no terminal.
//! - stdout and stderr are the rule's `log` (info and warn), a line at a time: each line is cut
//!   to [`MAX_LOG_LINE`] bytes and goes through the same rate limit as `log`; an unfinished line
//!   is written when the call ends.
//! - The filesystem has no preopened directory, so no file can be opened.
//! - `exit` ends the call with a `rule_exit` failure.
//!
//! - There is no network. `wasi:sockets` is linked only because every `componentize-py`
//!   component imports it (its C library does, whether the Python code uses sockets or not):
//!   each of its functions traps (`rule_trap`, naming the function), so no socket can be made.
//!
//! HTTP (`wasi:http`) and anything else not in [`INTERFACES`] or [`NO_NETWORK`] is refused at
//! load. The bindings are our own (`bindgen!` over the WASI WIT
//! files in `host/wit`), not `wasmtime-wasi`, which needs wasmtime's `async` feature. Resources
//! carry no host objects: a stream's handle says which stream it is, and the other resources
//! (pollables, which are always ready; descriptors, of which there are none) need nothing.

use wasmtime::component::Resource;

use super::{HostState, MAX_LOG_LINE, wit};

mod bindings {
    wasmtime::component::bindgen!({
        world: "deterministic-wasi",
        path: "wit",
        // Host functions that can fail do so as traps (`exit`, a draw of random bytes over the
        // limit); the generated signatures are uniform with it.
        imports: { default: trappable },
    });
}

use bindings::wasi::cli::{
    environment, exit, stderr, stdin, stdout, terminal_input, terminal_output, terminal_stderr,
    terminal_stdin, terminal_stdout,
};
use bindings::wasi::clocks::{monotonic_clock, wall_clock};
use bindings::wasi::filesystem::{preopens, types as filesystem};
use bindings::wasi::io::{error as io_error, poll, streams};
use bindings::wasi::random::{insecure, insecure_seed, random};

/// The WASI interfaces a rule may import, at any 0.2.x version (the host's are 0.2.12; wasmtime
/// links an import of an older 0.2 version to them).
pub(super) const INTERFACES: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
];

/// The `wasi:sockets` interfaces, linked to functions that trap: with the resource each one
/// defines (and names; the others it `use`s come from the interface that defines them).
pub(super) const NO_NETWORK: &[(&str, &[&str])] = &[
    ("wasi:sockets/network", &["network"]),
    ("wasi:sockets/instance-network", &[]),
    (
        "wasi:sockets/udp",
        &[
            "udp-socket",
            "incoming-datagram-stream",
            "outgoing-datagram-stream",
        ],
    ),
    ("wasi:sockets/udp-create-socket", &[]),
    ("wasi:sockets/tcp", &["tcp-socket"]),
    ("wasi:sockets/tcp-create-socket", &[]),
    ("wasi:sockets/ip-name-lookup", &["resolve-address-stream"]),
];

/// The interface of an import of WASI 0.2 (`wasi:io/streams@0.2.3` gives `wasi:io/streams`).
fn wasi_02_interface(import: &str) -> Option<&str> {
    import
        .split_once('@')
        .filter(|(_, version)| version.starts_with("0.2."))
        .map(|(interface, _)| interface)
}

/// Whether an import (`wasi:io/streams@0.2.3`) is one of the interfaces the host links: the
/// deterministic ones, or the sockets that trap.
pub(super) fn is_provided(import: &str) -> bool {
    wasi_02_interface(import).is_some_and(|interface| {
        INTERFACES.contains(&interface) || NO_NETWORK.iter().any(|(name, _)| *name == interface)
    })
}

/// A socket resource no rule can ever hold (nothing makes one).
struct NoSocket;

/// Links the `wasi:sockets` interfaces `component` imports (at the versions it imports) to
/// functions that trap, in `linker` (a copy of the shared one, for this component only).
pub(super) fn link_no_network(
    linker: &mut wasmtime::component::Linker<HostState>,
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> wasmtime::Result<()> {
    use wasmtime::component::types::ComponentItem;
    for (import, item) in component.component_type().imports(engine) {
        let Some(defined) = wasi_02_interface(import).and_then(|interface| {
            NO_NETWORK
                .iter()
                .find(|(name, _)| *name == interface)
                .map(|(_, defined)| *defined)
        }) else {
            continue;
        };
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            continue;
        };
        let mut linked = linker.instance(import)?;
        for (name, export) in instance.exports(engine) {
            match export.ty {
                ComponentItem::ComponentFunc(_) => {
                    let why = format!("the rule used `{import}#{name}`: rules have no network");
                    linked.func_new(name, move |mut store, _, _, _| {
                        let error = wasmtime::Error::msg(why.clone());
                        store.data_mut().wasi.refusal = Some(why.clone());
                        Err(error)
                    })?;
                }
                ComponentItem::Resource(_) if defined.contains(&name) => {
                    linked.resource(
                        name,
                        wasmtime::component::ResourceType::host::<NoSocket>(),
                        |_, _| Ok(()),
                    )?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Adds the deterministic WASI to the linker. A component that imports none of it pays
/// nothing: its imports are resolved once, when it is pre-instantiated.
pub(super) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    bindings::DeterministicWasi::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
        linker,
        |s| s,
    )
}

/// Most random bytes one draw may ask for: more is refused with a trap rather than allocated.
const MAX_RANDOM_BYTES: u64 = 1024 * 1024;

/// Bytes an output stream accepts per write (`check-write`).
const WRITE_PERMIT: u64 = 4096;

/// Handle of stdout; stderr's is [`STDERR`]. A stream handle carries no host object, only this.
const STDOUT: u32 = 1;
const STDERR: u32 = 2;

/// What WASI sees of the current call; one per `Store`. The default (what instantiation sees)
/// is time zero and random bytes from an all-zero seed: deterministic too.
#[derive(Default)]
pub(super) struct WasiCall {
    /// The request's `received_at_ms`: the only time the rule sees.
    now_ms: u64,
    /// The generator of the call's random bytes; made on first use.
    random: Option<RandomBytes>,
    /// The request id the generator is seeded from.
    seed: [u8; 32],
    /// The unfinished line of each stream.
    stdout: LineBuffer,
    stderr: LineBuffer,
    /// The status the rule passed to `exit`, which ends the call with `rule_exit`.
    pub(super) exit_status: Option<u8>,
    /// Why a WASI function refused and trapped, for the failure's message.
    pub(super) refusal: Option<String>,
    /// The last non-blank line the rule wrote to stderr in this call (escaped, bounded): where
    /// JavaScript and Python put an uncaught exception before the call traps, so a failure's
    /// message can say why instead of only "unreachable".
    pub(super) last_error_line: Option<String>,
}

impl WasiCall {
    /// Makes the clock and random bytes those of `request`, before the rule is called.
    pub(super) fn begin(&mut self, received_at_ms: u64, request_id: &str) {
        use sha2::{Digest, Sha256};
        self.now_ms = received_at_ms;
        self.seed = Sha256::new()
            .chain_update(b"turnstile wasi random\0")
            .chain_update(request_id.as_bytes())
            .finalize()
            .into();
        self.random = None;
        self.exit_status = None;
        self.refusal = None;
        self.last_error_line = None;
    }

    fn random(&mut self) -> &mut RandomBytes {
        let seed = self.seed;
        self.random.get_or_insert_with(|| RandomBytes::new(seed))
    }
}

/// SHA-256 of `seed || counter`, block after block: the same seed always gives the same bytes,
/// whatever the version of any random-number crate.
struct RandomBytes {
    seed: [u8; 32],
    counter: u64,
    block: [u8; 32],
    /// Bytes of `block` already handed out.
    used: usize,
}

impl RandomBytes {
    fn new(seed: [u8; 32]) -> RandomBytes {
        RandomBytes {
            seed,
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        use sha2::{Digest, Sha256};
        for byte in out {
            if self.used == self.block.len() {
                self.block = Sha256::new()
                    .chain_update(self.seed)
                    .chain_update(self.counter.to_le_bytes())
                    .finalize()
                    .into();
                self.counter += 1;
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut bytes = [0; 8];
        self.fill(&mut bytes);
        u64::from_le_bytes(bytes)
    }
}

/// The unfinished line of an output stream, kept to a little over [`MAX_LOG_LINE`] bytes (the
/// log cuts it and marks the cut).
#[derive(Default)]
struct LineBuffer {
    pending: Vec<u8>,
}

/// What the pinned toolchains' runtimes print to stderr after an uncaught exception, on the way
/// to the trap: StarlingMonkey (componentize-js 0.23) and componentize-py 0.25's Rust runtime.
/// Never taken for the rule's error message.
const TOOLCHAIN_TRAILERS: &[&str] = &[
    "Redirecting call to abort()",
    "Python function threw an unexpected exception",
    "note: run with `RUST_BACKTRACE=1`",
    "thread '",
];

/// Bytes of an unfinished line kept: enough for the log to see that the line was cut.
const MAX_PENDING: usize = MAX_LOG_LINE + 4;

impl LineBuffer {
    /// Appends `bytes`, moving each finished line to `lines`.
    fn push(&mut self, mut bytes: &[u8], lines: &mut Vec<String>) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..end]);
            lines.push(self.take());
            bytes = &bytes[end + 1..];
        }
        self.append(bytes);
    }

    fn append(&mut self, part: &[u8]) {
        let room = MAX_PENDING.saturating_sub(self.pending.len());
        self.pending
            .extend_from_slice(&part[..part.len().min(room)]);
    }

    fn take(&mut self) -> String {
        let mut line = String::from_utf8_lossy(&self.pending).into_owned();
        if line.ends_with('\r') {
            line.pop();
        }
        self.pending.clear();
        line
    }
}

impl HostState {
    fn write_output(&mut self, stream: u32, bytes: &[u8]) {
        let mut lines = Vec::new();
        let (buffer, level) = self.output_stream(stream);
        buffer.push(bytes, &mut lines);
        for line in lines {
            self.note_error_line(stream, &line);
            bindings_log(self, level, line);
        }
    }

    /// Remembers `line` as the call's error message if it is a stderr line that could be one;
    /// before the log's rate limit, which must not hide the reason of a failure. An uncaught
    /// exception prints its message unindented and its stack indented under a heading ending in
    /// `:` (Python: `Traceback (most recent call last):`, frames, then `ValueError: boom`;
    /// JavaScript: `boom`, `Stack:`, frames), so the last unindented line that is not such a
    /// heading is the message in both. The interpreters then print lines of their own on the
    /// way to the trap ([`TOOLCHAIN_TRAILERS`]), which are not the rule's.
    fn note_error_line(&mut self, stream: u32, line: &str) {
        let is_message = !line.trim().is_empty()
            && !line.starts_with(char::is_whitespace)
            && !line.trim_end().ends_with(':')
            && !TOOLCHAIN_TRAILERS.iter().any(|t| line.starts_with(t));
        if stream == STDERR && is_message {
            self.wasi.last_error_line = Some(super::escape_untrusted(line.trim(), MAX_LOG_LINE));
        }
    }

    fn output_stream(&mut self, stream: u32) -> (&mut LineBuffer, wit::Level) {
        if stream == STDERR {
            (&mut self.wasi.stderr, wit::Level::Warn)
        } else {
            (&mut self.wasi.stdout, wit::Level::Info)
        }
    }

    /// Writes the unfinished lines of stdout and stderr, after a call (or a failed one: what a
    /// rule printed before it trapped is often why).
    pub(super) fn end_wasi_call(&mut self) {
        for stream in [STDOUT, STDERR] {
            let (buffer, level) = self.output_stream(stream);
            if !buffer.pending.is_empty() {
                let line = buffer.take();
                self.note_error_line(stream, &line);
                bindings_log(self, level, line);
            }
        }
    }

    fn refuse(&mut self, why: String) -> wasmtime::Error {
        let error = wasmtime::Error::msg(why.clone());
        self.wasi.refusal = Some(why);
        error
    }
}

/// A line of stdout or stderr goes where the rule's `log` goes, under the same limits.
fn bindings_log(state: &mut HostState, level: wit::Level, line: String) {
    super::bindings::RuleImports::log(state, level, line);
}

fn pollable() -> Resource<poll::Pollable> {
    Resource::new_own(0)
}

impl wall_clock::Host for HostState {
    fn now(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        Ok(wall_clock::Datetime {
            seconds: self.wasi.now_ms / 1000,
            nanoseconds: (self.wasi.now_ms % 1000) as u32 * 1_000_000,
        })
    }

    fn resolution(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        Ok(wall_clock::Datetime {
            seconds: 0,
            nanoseconds: 1_000_000,
        })
    }
}

impl monotonic_clock::Host for HostState {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(self.wasi.now_ms.saturating_mul(1_000_000))
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(1_000_000)
    }

    fn subscribe_instant(
        &mut self,
        _when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<poll::Pollable>> {
        Ok(pollable())
    }

    fn subscribe_duration(
        &mut self,
        _when: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<poll::Pollable>> {
        Ok(pollable())
    }
}

impl random::Host for HostState {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_BYTES {
            return Err(self.refuse(format!(
                "the rule asked for {len} random bytes at once, more than the {MAX_RANDOM_BYTES}-byte limit"
            )));
        }
        let mut bytes = vec![0; len as usize];
        self.wasi.random().fill(&mut bytes);
        Ok(bytes)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.wasi.random().next_u64())
    }
}

impl insecure::Host for HostState {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        random::Host::get_random_bytes(self, len)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        random::Host::get_random_u64(self)
    }
}

impl insecure_seed::Host for HostState {
    fn insecure_seed(&mut self) -> wasmtime::Result<(u64, u64)> {
        let random = self.wasi.random();
        Ok((random.next_u64(), random.next_u64()))
    }
}

impl environment::Host for HostState {
    fn get_environment(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    fn get_arguments(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn initial_cwd(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(None)
    }
}

impl exit::Host for HostState {
    fn exit(&mut self, status: Result<(), ()>) -> wasmtime::Result<()> {
        exit::Host::exit_with_code(self, if status.is_ok() { 0 } else { 1 })
    }

    fn exit_with_code(&mut self, status_code: u8) -> wasmtime::Result<()> {
        self.wasi.exit_status = Some(status_code);
        wasmtime::bail!("the rule called exit({status_code})")
    }
}

impl stdin::Host for HostState {
    fn get_stdin(&mut self) -> wasmtime::Result<Resource<streams::InputStream>> {
        Ok(Resource::new_own(0))
    }
}

impl stdout::Host for HostState {
    fn get_stdout(&mut self) -> wasmtime::Result<Resource<streams::OutputStream>> {
        Ok(Resource::new_own(STDOUT))
    }
}

impl stderr::Host for HostState {
    fn get_stderr(&mut self) -> wasmtime::Result<Resource<streams::OutputStream>> {
        Ok(Resource::new_own(STDERR))
    }
}

impl terminal_input::HostTerminalInput for HostState {
    fn drop(&mut self, _rep: Resource<terminal_input::TerminalInput>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl terminal_input::Host for HostState {}

impl terminal_output::HostTerminalOutput for HostState {
    fn drop(&mut self, _rep: Resource<terminal_output::TerminalOutput>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl terminal_output::Host for HostState {}

impl terminal_stdin::Host for HostState {
    fn get_terminal_stdin(
        &mut self,
    ) -> wasmtime::Result<Option<Resource<terminal_input::TerminalInput>>> {
        Ok(None)
    }
}

impl terminal_stdout::Host for HostState {
    fn get_terminal_stdout(
        &mut self,
    ) -> wasmtime::Result<Option<Resource<terminal_output::TerminalOutput>>> {
        Ok(None)
    }
}

impl terminal_stderr::Host for HostState {
    fn get_terminal_stderr(
        &mut self,
    ) -> wasmtime::Result<Option<Resource<terminal_output::TerminalOutput>>> {
        Ok(None)
    }
}

impl io_error::HostError for HostState {
    fn to_debug_string(&mut self, _self_: Resource<io_error::Error>) -> wasmtime::Result<String> {
        Ok(String::new())
    }

    fn drop(&mut self, _rep: Resource<io_error::Error>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl io_error::Host for HostState {}

impl poll::HostPollable for HostState {
    fn ready(&mut self, _self_: Resource<poll::Pollable>) -> wasmtime::Result<bool> {
        Ok(true)
    }

    fn block(&mut self, _self_: Resource<poll::Pollable>) -> wasmtime::Result<()> {
        Ok(())
    }

    fn drop(&mut self, _rep: Resource<poll::Pollable>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl poll::Host for HostState {
    fn poll(&mut self, pollables: Vec<Resource<poll::Pollable>>) -> wasmtime::Result<Vec<u32>> {
        // Everything is ready. The list's length is bounded by what the rule may hand the host
        // at once (hostcall fuel).
        Ok((0..pollables.len() as u32).collect())
    }
}

impl streams::HostInputStream for HostState {
    fn read(
        &mut self,
        _self_: Resource<streams::InputStream>,
        _len: u64,
    ) -> wasmtime::Result<Result<Vec<u8>, streams::StreamError>> {
        Ok(Err(streams::StreamError::Closed))
    }

    fn blocking_read(
        &mut self,
        _self_: Resource<streams::InputStream>,
        _len: u64,
    ) -> wasmtime::Result<Result<Vec<u8>, streams::StreamError>> {
        Ok(Err(streams::StreamError::Closed))
    }

    fn skip(
        &mut self,
        _self_: Resource<streams::InputStream>,
        _len: u64,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        Ok(Err(streams::StreamError::Closed))
    }

    fn blocking_skip(
        &mut self,
        _self_: Resource<streams::InputStream>,
        _len: u64,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        Ok(Err(streams::StreamError::Closed))
    }

    fn subscribe(
        &mut self,
        _self_: Resource<streams::InputStream>,
    ) -> wasmtime::Result<Resource<poll::Pollable>> {
        Ok(pollable())
    }

    fn drop(&mut self, _rep: Resource<streams::InputStream>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl streams::HostOutputStream for HostState {
    fn check_write(
        &mut self,
        _self_: Resource<streams::OutputStream>,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        Ok(Ok(WRITE_PERMIT))
    }

    fn write(
        &mut self,
        self_: Resource<streams::OutputStream>,
        contents: Vec<u8>,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        self.write_output(self_.rep(), &contents);
        Ok(Ok(()))
    }

    fn blocking_write_and_flush(
        &mut self,
        self_: Resource<streams::OutputStream>,
        contents: Vec<u8>,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        self.write_output(self_.rep(), &contents);
        Ok(Ok(()))
    }

    fn flush(
        &mut self,
        _self_: Resource<streams::OutputStream>,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        Ok(Ok(()))
    }

    fn blocking_flush(
        &mut self,
        _self_: Resource<streams::OutputStream>,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        Ok(Ok(()))
    }

    fn subscribe(
        &mut self,
        _self_: Resource<streams::OutputStream>,
    ) -> wasmtime::Result<Resource<poll::Pollable>> {
        Ok(pollable())
    }

    fn write_zeroes(
        &mut self,
        self_: Resource<streams::OutputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        // Zeroes hold no line break: past what a line keeps, the rest changes nothing.
        let kept = len.min(MAX_PENDING as u64) as usize;
        self.write_output(self_.rep(), &vec![0; kept]);
        Ok(Ok(()))
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        self_: Resource<streams::OutputStream>,
        len: u64,
    ) -> wasmtime::Result<Result<(), streams::StreamError>> {
        streams::HostOutputStream::write_zeroes(self, self_, len)
    }

    fn splice(
        &mut self,
        _self_: Resource<streams::OutputStream>,
        _src: Resource<streams::InputStream>,
        _len: u64,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        // The only input stream is stdin, which is at its end.
        Ok(Err(streams::StreamError::Closed))
    }

    fn blocking_splice(
        &mut self,
        _self_: Resource<streams::OutputStream>,
        _src: Resource<streams::InputStream>,
        _len: u64,
    ) -> wasmtime::Result<Result<u64, streams::StreamError>> {
        Ok(Err(streams::StreamError::Closed))
    }

    fn drop(&mut self, _rep: Resource<streams::OutputStream>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl streams::Host for HostState {}

impl preopens::Host for HostState {
    fn get_directories(
        &mut self,
    ) -> wasmtime::Result<Vec<(Resource<filesystem::Descriptor>, String)>> {
        Ok(Vec::new())
    }
}

/// What every descriptor operation answers. No descriptor can exist (there are no preopened
/// directories, so nothing can be opened), so these are never reached with a real handle.
const NO_FILESYSTEM: filesystem::ErrorCode = filesystem::ErrorCode::BadDescriptor;

/// Descriptor methods taking only the descriptor, all answering [`NO_FILESYSTEM`].
macro_rules! no_filesystem {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ok:ty;)*) => {
        $(
            fn $name(
                &mut self,
                _self_: Resource<filesystem::Descriptor>,
                $($arg: $ty),*
            ) -> wasmtime::Result<Result<$ok, filesystem::ErrorCode>> {
                let _ = ($($arg,)*);
                Ok(Err(NO_FILESYSTEM))
            }
        )*
    };
}

impl filesystem::HostDescriptor for HostState {
    no_filesystem! {
        read_via_stream(offset: filesystem::Filesize) -> Resource<streams::InputStream>;
        write_via_stream(offset: filesystem::Filesize) -> Resource<streams::OutputStream>;
        append_via_stream() -> Resource<streams::OutputStream>;
        advise(offset: filesystem::Filesize, length: filesystem::Filesize, advice: filesystem::Advice) -> ();
        sync_data() -> ();
        get_flags() -> filesystem::DescriptorFlags;
        get_type() -> filesystem::DescriptorType;
        set_size(size: filesystem::Filesize) -> ();
        set_times(atime: filesystem::NewTimestamp, mtime: filesystem::NewTimestamp) -> ();
        read(length: filesystem::Filesize, offset: filesystem::Filesize) -> (Vec<u8>, bool);
        write(buffer: Vec<u8>, offset: filesystem::Filesize) -> filesystem::Filesize;
        read_directory() -> Resource<filesystem::DirectoryEntryStream>;
        sync() -> ();
        create_directory_at(path: String) -> ();
        stat() -> filesystem::DescriptorStat;
        stat_at(path_flags: filesystem::PathFlags, path: String) -> filesystem::DescriptorStat;
        set_times_at(path_flags: filesystem::PathFlags, path: String, atime: filesystem::NewTimestamp, mtime: filesystem::NewTimestamp) -> ();
        link_at(old_path_flags: filesystem::PathFlags, old_path: String, new_descriptor: Resource<filesystem::Descriptor>, new_path: String) -> ();
        open_at(path_flags: filesystem::PathFlags, path: String, open_flags: filesystem::OpenFlags, flags: filesystem::DescriptorFlags) -> Resource<filesystem::Descriptor>;
        readlink_at(path: String) -> String;
        remove_directory_at(path: String) -> ();
        rename_at(old_path: String, new_descriptor: Resource<filesystem::Descriptor>, new_path: String) -> ();
        symlink_at(old_path: String, new_path: String) -> ();
        unlink_file_at(path: String) -> ();
        metadata_hash() -> filesystem::MetadataHashValue;
        metadata_hash_at(path_flags: filesystem::PathFlags, path: String) -> filesystem::MetadataHashValue;
    }

    fn is_same_object(
        &mut self,
        _self_: Resource<filesystem::Descriptor>,
        _other: Resource<filesystem::Descriptor>,
    ) -> wasmtime::Result<bool> {
        Ok(false)
    }

    fn drop(&mut self, _rep: Resource<filesystem::Descriptor>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl filesystem::HostDirectoryEntryStream for HostState {
    fn read_directory_entry(
        &mut self,
        _self_: Resource<filesystem::DirectoryEntryStream>,
    ) -> wasmtime::Result<Result<Option<filesystem::DirectoryEntry>, filesystem::ErrorCode>> {
        Ok(Err(NO_FILESYSTEM))
    }

    fn drop(&mut self, _rep: Resource<filesystem::DirectoryEntryStream>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl filesystem::Host for HostState {
    fn filesystem_error_code(
        &mut self,
        _err: Resource<io_error::Error>,
    ) -> wasmtime::Result<Option<filesystem::ErrorCode>> {
        Ok(None)
    }
}
