//! Builds rule crates into the WebAssembly components the Turnstile host loads.
//!
//! One code path serves three callers: the host's build script (the embedded reference rule),
//! the tests' build script (the test guests) and `turnstile build` (a rule author's crate). A
//! rule is compiled for `wasm32-unknown-unknown` and then wrapped into a component with
//! `wit-component`, the way wasmtime's own component example is built: unlike `wasm32-wasip2`,
//! this gives a component with no WASI imports at all, which instantiates about twice as fast and
//! can do nothing but compute.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub mod languages;

/// The target rules compile to before they are wrapped into components.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// What a build produced for one package.
#[derive(Debug, Clone)]
pub struct BuiltComponent {
    /// The cargo package name.
    pub package: String,
    /// Path of the component file (`<target-dir>/components/<package>.wasm`).
    pub path: PathBuf,
}

/// How to run cargo for a guest build.
#[derive(Debug, Clone)]
pub struct GuestBuild {
    /// The `Cargo.toml` of the crate or workspace that holds the packages.
    pub manifest_path: PathBuf,
    /// Where cargo puts its output. Must differ from the calling cargo's own target dir when
    /// called from a build script, or the nested cargo would wait forever on the outer one's lock.
    pub target_dir: PathBuf,
    /// The cargo program to run (`$CARGO` inside build scripts, `cargo` elsewhere).
    pub cargo: PathBuf,
    /// Whether cargo should print its progress (on for `turnstile build`, off in build scripts,
    /// whose output cargo hides anyway).
    pub quiet: bool,
}

/// Choices `turnstile build` offers beyond the defaults the build scripts use.
#[derive(Debug, Default, Clone)]
pub struct BuildOptions {
    /// Keep the name section (function names in backtraces) instead of stripping it.
    pub debug: bool,
    /// `--remap-path-prefix` pairs (from, to) so machine-specific paths (the crate's directory,
    /// `CARGO_HOME`) do not end up in the bytes and the version id.
    pub remap_path_prefixes: Vec<(PathBuf, String)>,
}

impl GuestBuild {
    /// Builds `packages` (empty: the manifest's own package) and wraps each into a component.
    pub fn build(&self, packages: &[&str]) -> Result<Vec<BuiltComponent>> {
        self.build_with(packages, &BuildOptions::default())
    }

    /// [`GuestBuild::build`] with `options`.
    pub fn build_with(
        &self,
        packages: &[&str],
        options: &BuildOptions,
    ) -> Result<Vec<BuiltComponent>> {
        ensure_wasm_target()?;
        let mut cargo = Command::new(&self.cargo);
        cargo
            .arg("build")
            .arg("--release")
            .arg("--target")
            .arg(WASM_TARGET)
            .arg("--manifest-path")
            .arg(&self.manifest_path)
            .arg("--target-dir")
            .arg(&self.target_dir)
            // Small and fast rules whatever the crate's own profile says: rules are loaded into
            // every partition, and their size is checked against a limit.
            .args(["--config", "profile.release.opt-level=\"s\""])
            .args(["--config", "profile.release.lto=true"])
            .args(["--config", "profile.release.codegen-units=1"])
            .args(["--config", "profile.release.panic=\"abort\""])
            .args(["--config", "profile.release.debug=false"]);
        // `strip = false` keeps the name section, which is what wasmtime's backtraces read.
        cargo.args([
            "--config",
            if options.debug {
                "profile.release.strip=false"
            } else {
                "profile.release.strip=true"
            },
        ]);
        if self.quiet {
            cargo.arg("--quiet");
        }
        for package in packages {
            cargo.arg("-p").arg(package);
        }
        // Flags meant for the outer (native) build must not leak into the wasm build.
        for var in [
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_RUSTFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
        ] {
            cargo.env_remove(var);
        }
        if !options.remap_path_prefixes.is_empty() {
            // The unit separator is how cargo splits CARGO_ENCODED_RUSTFLAGS; paths may hold spaces.
            let flags: Vec<String> = options
                .remap_path_prefixes
                .iter()
                .map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display()))
                .collect();
            cargo.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}"));
        }
        let status = cargo
            .status()
            .with_context(|| format!("running {}", self.cargo.display()))?;
        if !status.success() {
            bail!(
                "cargo build for {WASM_TARGET} failed ({status}); see cargo's output above \
                 (a missing target is installed with `rustup target add {WASM_TARGET}`)"
            );
        }

        let names: Vec<String> = if packages.is_empty() {
            vec![package_name(&self.manifest_path)?]
        } else {
            packages.iter().map(|p| p.to_string()).collect()
        };
        let out = self.target_dir.join("components");
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        names
            .into_iter()
            .map(|package| {
                let core = self
                    .target_dir
                    .join(WASM_TARGET)
                    .join("release")
                    .join(format!("{}.wasm", package.replace('-', "_")));
                let path = out.join(format!("{package}.wasm"));
                let bytes = std::fs::read(&core).with_context(|| {
                    format!(
                        "reading {} (is `crate-type = [\"cdylib\"]` set in the crate's [lib]?)",
                        core.display()
                    )
                })?;
                let component = componentize(&bytes)
                    .with_context(|| format!("making a component of {}", core.display()))?;
                std::fs::write(&path, component)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(BuiltComponent { package, path })
            })
            .collect()
    }
}

/// Makes sure the toolchain cargo will use has the standard library for [`WASM_TARGET`]: when the
/// toolchain is installed without it (or rustup's auto-install is off), the build would otherwise
/// fail deep inside with "can't find crate for `core`". With rustup it is added; without, the
/// error says what to install.
pub fn ensure_wasm_target() -> Result<()> {
    // In a build script RUSTC is the compiler cargo uses; elsewhere `rustc` resolves the same way
    // cargo does (rustup's proxy honours rust-toolchain.toml from the current directory).
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .with_context(|| format!("running {} --print sysroot", rustc.display()))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !output.status.success() || sysroot.join("lib/rustlib").join(WASM_TARGET).exists() {
        // A rustc that cannot say: let cargo report whatever is wrong.
        return Ok(());
    }
    match Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => bail!(
            "the {WASM_TARGET} target is missing from {} and `rustup target add {WASM_TARGET}` failed ({status})",
            sysroot.display()
        ),
        Err(_) => bail!(
            "the {WASM_TARGET} target is missing from {} and rustup is not available: install the \
             toolchain's standard library for {WASM_TARGET} (e.g. `rustup target add {WASM_TARGET}`)",
            sysroot.display()
        ),
    }
}

/// Wraps a core module built with wit-bindgen (it carries its WIT world in a custom section) into
/// a component.
pub fn componentize(core_module: &[u8]) -> Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(core_module)?
        .validate(true)
        .encode()
}

/// The `[package] name` of a crate's manifest, read without a TOML parser: the build scripts
/// that use this crate should stay light.
fn package_name(manifest_path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package
            && let Some(value) = line.strip_prefix("name")
            && let Some(value) = value.trim_start().strip_prefix('=')
        {
            return Ok(value.trim().trim_matches('"').to_string());
        }
    }
    bail!(
        "{} has no [package] name; point at a rule crate, not a workspace",
        manifest_path.display()
    )
}
