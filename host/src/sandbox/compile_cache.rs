//! The compiled-component cache: machine code wasmtime made from a rule component, kept on disk
//! so that the next `check`, `test`, `replay`, `run` or install of the same component skips
//! compilation. A Rust rule compiles in tens of milliseconds, but a JavaScript or Python rule
//! carries an interpreter and takes 20–40 s of CPU (BENCHMARKS.md, "Issue 17"); with the cache,
//! loading it again takes well under a second.
//!
//! Where: `$TURNSTILE_COMPILE_CACHE` (a directory, or `off`), else
//! `$XDG_CACHE_HOME/turnstile/compiled`, else `$HOME/.cache/turnstile/compiled`.
//!
//! One entry per component and engine configuration, named
//! `<sha256 of the component>-<engine key>.cwasm`. The engine key hashes what wasmtime says
//! decides whether compiled code fits an engine (its version, the target, the settings that
//! change code: `rule.spectre_hardening`, fuel, epochs), so configurations never share an entry.
//! An entry is:
//!
//! | bytes | what |
//! |---|---|
//! | 16 | [`MAGIC`] |
//! | 8 | CPU time the compilation took, in ms, little-endian |
//! | 32 | sha256 of the component's version id, the engine key, the 8 bytes above and the code below |
//! | rest | the compiled component, as `Component::serialize` wrote it |
//!
//! Trust: loading an entry runs native code without checking it again (that is the point), so
//! whatever could put bytes at an entry's name could run code as the user. Hence:
//! - the directory is created private (0700) and opened once per load, without following a
//!   symbolic link; the open directory must belong to this user and let no group or other user
//!   write (else it is not used, and a warning says so). Entries are then opened *through that open
//!   directory* (`/proc/self/fd/N/<entry>`), so renaming directories above it afterwards (a
//!   parent another user can write to) cannot slip another directory in;
//! - an entry is opened without following a symbolic link and without blocking (a FIFO is not
//!   waited on), and must be a regular file of this user, at most [`MAX_ENTRY_BYTES`]; it is read
//!   only then;
//! - the digest binds an entry to its component and engine: an entry renamed or copied to another
//!   component's name fails it. It is not a signature: it cannot stop the user's own processes,
//!   which are as trusted as the user;
//! - a torn write or a flipped bit fails the digest too, and the component is compiled again
//!   (and the entry rewritten); entries are written to a temporary name and renamed, so a reader
//!   never sees half of one;
//! - the compile budget still holds: an entry remembers what its compilation cost, and a
//!   component whose compilation took longer than `rule.max_compile_ms` is refused as if it had
//!   been compiled now. Every other load check (size, function count, imports, the trial
//!   instance) runs on the component's own bytes at every load.
//!
//! The cache is bounded ([`MAX_CACHE_BYTES`]): after each new entry, the least recently used are
//! deleted until the rest fits; temporary files a killed process left count too, and go once
//! they are an hour old. Every failure of the cache (unwritable directory, full disk) costs
//! only speed: the component is compiled as if there were no cache.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The environment variable naming the cache directory (`off` turns the cache off).
const CACHE_ENV: &str = "TURNSTILE_COMPILE_CACHE";

/// The first bytes of every entry: the format, so a file from another format is not misread.
const MAGIC: &[u8; 16] = b"turnstile-cwasm2";

/// Bytes before the compiled code: magic, compile time, digest.
const HEADER_BYTES: usize = 16 + 8 + 32;

/// Most bytes the cache keeps; a JavaScript or Python rule's entry is 30–60 MB.
const MAX_CACHE_BYTES: u64 = 2 << 30;

/// Largest entry read: far above any component the load limits let through (`max_module_bytes`
/// is at most 32 MiB by default and its code a few times that), so a file of unbounded size
/// (a link to `/dev/zero` cannot get here, but a huge file could) is not read into memory.
const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// How old a temporary file must be before eviction takes it for one a killed process left.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

/// A directory of compiled components.
#[derive(Debug, Clone)]
pub(super) struct CompileCache {
    /// Where the entries are; created (private) on the first write.
    dir: PathBuf,
}

/// What loading an entry found.
pub(super) struct CachedComponent {
    /// The component, ready to instantiate.
    pub component: Component,
    /// CPU time its compilation took when the entry was made: held to the compile budget.
    pub compile_cpu: Duration,
}

/// The cache directory, open and checked: paths through it cannot be redirected.
struct OpenDir(File);

impl OpenDir {
    /// `name` inside the open directory, whatever happens to the path it was opened by.
    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.0.as_raw_fd()))
    }
}

/// Which entry and which check: what the digest binds together besides the code.
struct EntryKey {
    /// The component's version id (sha256 of its bytes, hex).
    version: String,
    /// The engine's compatibility hash.
    engine: u64,
}

impl EntryKey {
    fn of(engine: &Engine, bytes: &[u8]) -> EntryKey {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        EntryKey {
            version: super::version_id(bytes),
            engine: hasher.finish(),
        }
    }

    fn file_name(&self) -> String {
        format!("{}-{:016x}.cwasm", self.version, self.engine)
    }
}

impl CompileCache {
    /// The cache the environment asks for (see the module docs), or none when it is turned off
    /// or there is no home directory to keep it in.
    pub(super) fn from_env() -> Option<CompileCache> {
        let dir = match std::env::var_os(CACHE_ENV) {
            Some(value) if value == "off" || value.is_empty() => return None,
            Some(value) => PathBuf::from(value),
            None => {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME")
                            .filter(|v| !v.is_empty())
                            .map(|home| PathBuf::from(home).join(".cache"))
                    })?;
                base.join("turnstile").join("compiled")
            }
        };
        Some(CompileCache { dir })
    }

    /// Opens the directory without following a link, and keeps it only if it is this user's and
    /// nobody else can write to it; `None` (with a warning when it exists but is not private)
    /// otherwise.
    fn open_dir(&self) -> Option<OpenDir> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&self.dir)
            .map_err(|e| {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(
                        cache = %self.dir.display(),
                        "the compiled component cache directory cannot be opened as a directory ({e}); it is not used"
                    );
                }
            })
            .ok()?;
        let meta = dir.metadata().ok()?;
        // `/proc/self` belongs to the process's effective user.
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if Some(meta.uid()) != me || meta.mode() & 0o022 != 0 {
            tracing::warn!(
                cache = %self.dir.display(),
                "the compiled component cache directory is not private to this user (another owner, or group/other write permission); it is not used"
            );
            return None;
        }
        Some(OpenDir(dir))
    }

    /// The compiled `bytes` if an intact entry for this engine is there.
    // The one exception to the crate's `unsafe_code` lint: loading compiled code is unsafe in
    // wasmtime's API, and the SAFETY comment below says why this use is sound.
    #[allow(unsafe_code)]
    pub(super) fn load(&self, engine: &Engine, bytes: &[u8]) -> Option<CachedComponent> {
        let key = EntryKey::of(engine, bytes);
        let dir = self.open_dir()?;
        let path = dir.path(&key.file_name());
        let shown = self.dir.join(key.file_name());
        let entry = match read_entry(&path) {
            Ok(Some(entry)) => entry,
            Ok(None) => return None,
            Err(why) => {
                tracing::warn!(entry = %shown.display(), "a compiled component cache entry is not used: {why}");
                return None;
            }
        };
        let Some((compile_cpu, code)) = parse_entry(&key, &entry) else {
            tracing::warn!(
                entry = %shown.display(),
                "a compiled component cache entry is damaged or not this component's; compiling the component again"
            );
            let _ = std::fs::remove_file(&path);
            return None;
        };
        // SAFETY: `code` is what `Component::serialize` wrote for this very component (its
        // version id is in the digest) and an engine with the same compatibility hash (in the
        // digest and the name; wasmtime checks it again), and the digest proves it unchanged
        // since. Only this user's processes can have written it: the directory was opened
        // without following links, is this user's and nobody else can write to it (checked on
        // the open directory itself), and the entry is a regular file of this user read through
        // that open directory.
        match unsafe { Component::deserialize(engine, code) } {
            Ok(component) => {
                // Least recently used goes first when the cache is over its size.
                let _ = std::fs::File::options()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(CachedComponent {
                    component,
                    compile_cpu,
                })
            }
            Err(e) => {
                tracing::debug!(entry = %shown.display(), "compiled component cache entry not usable: {e:#}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps `component` (compiled from `bytes` by `engine` in `compile_cpu`) for next time.
    pub(super) fn store(
        &self,
        engine: &Engine,
        bytes: &[u8],
        component: &Component,
        compile_cpu: Duration,
    ) {
        if let Err(e) = self.try_store(engine, bytes, component, compile_cpu) {
            tracing::warn!(
                cache = %self.dir.display(),
                "could not keep the compiled component in the cache (the next load compiles it again): {e:#}"
            );
        }
    }

    fn try_store(
        &self,
        engine: &Engine,
        bytes: &[u8],
        component: &Component,
        compile_cpu: Duration,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let Some(dir) = self.open_dir() else {
            return Ok(());
        };
        let key = EntryKey::of(engine, bytes);
        let code = component.serialize()?;
        let entry = encode_entry(&key, compile_cpu, &code);
        let name = key.file_name();
        let temporary = dir.path(&format!(
            ".{name}.{}-{:?}.tmp",
            std::process::id(),
            std::thread::current().id()
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temporary)
            .and_then(|mut file| file.write_all(&entry))
            .and_then(|()| std::fs::rename(&temporary, dir.path(&name)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(e).with_context(|| format!("writing {}", self.dir.join(&name).display()));
        }
        evict(&dir, MAX_CACHE_BYTES);
        Ok(())
    }
}

/// An entry's bytes, read through the open directory: `Ok(None)` when there is none, an error
/// naming why when what is there is not a regular file of this user of a sane size.
fn read_entry(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    // No link followed, and a FIFO is opened without waiting for a writer.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot be opened without following a link ({e})")),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    if Some(meta.uid()) != me {
        return Err("it belongs to another user".into());
    }
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(format!("it is larger than {MAX_ENTRY_BYTES} bytes"));
    }
    let mut entry = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_ENTRY_BYTES)
        .read_to_end(&mut entry)
        .map_err(|e| e.to_string())?;
    Ok(Some(entry))
}

/// Deletes the least recently used entries until the cache holds at most `max_bytes`; temporary
/// files count, and those a killed process left (over [`STALE_TEMPORARY`] old) are deleted.
fn evict(dir: &OpenDir, max_bytes: u64) {
    let Ok(listing) = std::fs::read_dir(dir.path("")) else {
        return;
    };
    let now = SystemTime::now();
    let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    let mut total: u64 = 0;
    for item in listing.filter_map(|e| e.ok()) {
        let Ok(meta) = item.metadata() else { continue };
        let Ok(modified) = meta.modified() else {
            continue;
        };
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tmp") {
            let age = now.duration_since(modified).unwrap_or_default();
            if age > STALE_TEMPORARY && std::fs::remove_file(item.path()).is_ok() {
                continue;
            }
            total += meta.len();
        } else if name.ends_with(".cwasm") {
            total += meta.len();
            entries.push((modified, meta.len(), item.path()));
        }
    }
    entries.sort();
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

/// The digest of an entry: binds the code to its component, engine and compile time.
fn digest(key: &EntryKey, millis: [u8; 8], code: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(key.version.as_bytes())
        .chain_update(key.engine.to_le_bytes())
        .chain_update(millis)
        .chain_update(code)
        .finalize()
        .into()
}

/// An entry's bytes (see the module docs).
fn encode_entry(key: &EntryKey, compile_cpu: Duration, code: &[u8]) -> Vec<u8> {
    let millis = (compile_cpu.as_millis() as u64).to_le_bytes();
    let mut entry = Vec::with_capacity(HEADER_BYTES + code.len());
    entry.extend_from_slice(MAGIC);
    entry.extend_from_slice(&millis);
    entry.extend_from_slice(&digest(key, millis, code));
    entry.extend_from_slice(code);
    entry
}

/// The compile time and the code of an intact entry of `key`; none when anything does not match.
fn parse_entry<'a>(key: &EntryKey, entry: &'a [u8]) -> Option<(Duration, &'a [u8])> {
    if entry.len() < HEADER_BYTES || &entry[..16] != MAGIC {
        return None;
    }
    let millis: [u8; 8] = entry[16..24].try_into().ok()?;
    let code = &entry[HEADER_BYTES..];
    if digest(key, millis, code) != entry[24..HEADER_BYTES] {
        return None;
    }
    Some((Duration::from_millis(u64::from_le_bytes(millis)), code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_and_any_flipped_byte_or_other_key_is_refused() {
        let key = EntryKey {
            version: "ab".repeat(32),
            engine: 7,
        };
        let entry = encode_entry(&key, Duration::from_millis(1234), b"compiled code");
        let (cpu, code) = parse_entry(&key, &entry).expect("intact entry");
        assert_eq!(cpu, Duration::from_millis(1234));
        assert_eq!(code, b"compiled code");
        for at in 0..entry.len() {
            let mut damaged = entry.clone();
            damaged[at] ^= 0x40;
            assert!(
                parse_entry(&key, &damaged).is_none(),
                "flip at byte {at} not seen"
            );
        }
        assert!(parse_entry(&key, &entry[..entry.len() - 1]).is_none());
        assert!(parse_entry(&key, &entry[..HEADER_BYTES - 1]).is_none());
        let other_component = EntryKey {
            version: "cd".repeat(32),
            engine: 7,
        };
        let other_engine = EntryKey {
            version: "ab".repeat(32),
            engine: 8,
        };
        assert!(parse_entry(&other_component, &entry).is_none());
        assert!(parse_entry(&other_engine, &entry).is_none());
    }
}
