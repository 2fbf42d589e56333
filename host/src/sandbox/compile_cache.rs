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
//! | 32 | sha256 of the 8 bytes above and the code below |
//! | rest | the compiled component, as `Component::serialize` wrote it |
//!
//! Trust: loading an entry runs native code without checking it again (that is the point), so:
//! - a torn write or a flipped bit fails the sha256 and the component is compiled again (and the
//!   entry rewritten);
//! - entries are written to a temporary name and renamed, so a reader never sees half of one;
//! - the directory is created private (0700) and a directory others can write to is not used
//!   (a warning says so): whoever can write there could run code as the user, like anyone who can
//!   write the `turnstile` binary itself;
//! - the compile budget still holds: an entry remembers what its compilation cost, and a
//!   component whose compilation took longer than `rule.max_compile_ms` is refused as if it had
//!   been compiled now.
//!
//! The cache is bounded ([`MAX_CACHE_BYTES`]): after each new entry, the least recently used are
//! deleted until the rest fits. Every failure of the cache (unwritable directory, full disk) costs
//! only speed: the component is compiled as if there were no cache.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The environment variable naming the cache directory (`off` turns the cache off).
const CACHE_ENV: &str = "TURNSTILE_COMPILE_CACHE";

/// The first bytes of every entry: the format, so a file from a later format is not misread.
const MAGIC: &[u8; 16] = b"turnstile-cwasm1";

/// Bytes before the compiled code: magic, compile time, digest.
const HEADER_BYTES: usize = 16 + 8 + 32;

/// Most bytes the cache keeps; a JavaScript or Python rule's entry is 30–60 MB.
const MAX_CACHE_BYTES: u64 = 2 << 30;

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

    /// The entry for `bytes` compiled by `engine`.
    fn entry_path(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.dir.join(format!(
            "{}-{:016x}.cwasm",
            super::version_id(bytes),
            hasher.finish()
        ))
    }

    /// The compiled `bytes` if an intact entry for this engine is there.
    // The one exception to the crate's `unsafe_code` lint: loading compiled code is unsafe in
    // wasmtime's API, and the SAFETY comment below says why this use is sound.
    #[allow(unsafe_code)]
    pub(super) fn load(&self, engine: &Engine, bytes: &[u8]) -> Option<CachedComponent> {
        let path = self.entry_path(engine, bytes);
        let entry = std::fs::read(&path).ok()?;
        if !self.is_private_dir() {
            return None;
        }
        let Some((compile_cpu, code)) = parse_entry(&entry) else {
            tracing::warn!(
                entry = %path.display(),
                "a compiled component cache entry is damaged; compiling the component again"
            );
            let _ = std::fs::remove_file(&path);
            return None;
        };
        // SAFETY: `code` is what `Component::serialize` wrote for an engine with the same
        // compatibility hash (it is in the entry's name; wasmtime checks it again), and the
        // digest proves it is unchanged since: the directory is private to this user (checked
        // above), so only a process of this user wrote it, and only this code writes entries.
        match unsafe { Component::deserialize(engine, code) } {
            Ok(component) => {
                // Least recently used goes first when the cache is over its size.
                let _ = std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(CachedComponent {
                    component,
                    compile_cpu,
                })
            }
            Err(e) => {
                tracing::debug!(entry = %path.display(), "compiled component cache entry not usable: {e:#}");
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
        if !self.is_private_dir() {
            return Ok(());
        }
        let code = component.serialize()?;
        let entry = encode_entry(compile_cpu, &code);
        let path = self.entry_path(engine, bytes);
        let temporary = self.dir.join(format!(
            ".{}.{}-{:?}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            std::thread::current().id()
        ));
        let written = std::fs::File::create(&temporary)
            .and_then(|mut file| file.write_all(&entry))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
        self.evict(MAX_CACHE_BYTES);
        Ok(())
    }

    /// Whether the directory is one only its owner can write to; warns when it is not.
    fn is_private_dir(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(&self.dir) else {
            return false;
        };
        // `/proc/self` belongs to the process's effective user.
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if Some(meta.uid()) != me || meta.mode() & 0o022 != 0 {
            tracing::warn!(
                cache = %self.dir.display(),
                "the compiled component cache directory is not private to this user (owner or group/other write permission); it is not used"
            );
            return false;
        }
        true
    }

    /// Deletes the least recently used entries until the cache holds at most `max_bytes`.
    fn evict(&self, max_bytes: u64) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = dir
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
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
}

/// An entry's bytes (see the module docs).
fn encode_entry(compile_cpu: Duration, code: &[u8]) -> Vec<u8> {
    let millis = (compile_cpu.as_millis() as u64).to_le_bytes();
    let digest = Sha256::new()
        .chain_update(millis)
        .chain_update(code)
        .finalize();
    let mut entry = Vec::with_capacity(HEADER_BYTES + code.len());
    entry.extend_from_slice(MAGIC);
    entry.extend_from_slice(&millis);
    entry.extend_from_slice(&digest);
    entry.extend_from_slice(code);
    entry
}

/// The compile time and the code of an intact entry; none when anything does not match.
fn parse_entry(entry: &[u8]) -> Option<(Duration, &[u8])> {
    if entry.len() < HEADER_BYTES || &entry[..16] != MAGIC {
        return None;
    }
    let millis: [u8; 8] = entry[16..24].try_into().ok()?;
    let code = &entry[HEADER_BYTES..];
    let digest = Sha256::new()
        .chain_update(millis)
        .chain_update(code)
        .finalize();
    if digest.as_slice() != &entry[24..HEADER_BYTES] {
        return None;
    }
    Some((Duration::from_millis(u64::from_le_bytes(millis)), code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_and_any_flipped_byte_is_refused() {
        let entry = encode_entry(Duration::from_millis(1234), b"compiled code");
        let (cpu, code) = parse_entry(&entry).expect("intact entry");
        assert_eq!(cpu, Duration::from_millis(1234));
        assert_eq!(code, b"compiled code");
        for at in 0..entry.len() {
            let mut damaged = entry.clone();
            damaged[at] ^= 0x40;
            assert!(
                parse_entry(&damaged).is_none(),
                "flip at byte {at} not seen"
            );
        }
        assert!(parse_entry(&entry[..entry.len() - 1]).is_none());
        assert!(parse_entry(&entry[..HEADER_BYTES - 1]).is_none());
    }
}
