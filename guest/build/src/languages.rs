//! Rules written in JavaScript and Python: which language a rule project is in, and the builds
//! that turn one into a component with the language's pinned toolchain (`componentize-js` from
//! the npm registry, `componentize-py` from PyPI). One code path for `turnstile build` and the
//! tests' build script, so both build a rule exactly the same way.
//!
//! Both toolchains embed an interpreter (SpiderMonkey, CPython) that imports WASI (clocks, random,
//! stdio, ...); the host's deterministic WASI satisfies those imports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// The npm package that builds JavaScript rules, as pinned in `guest/js/package.json` and in the
/// `package.json` of every project `turnstile new --lang js` writes.
pub const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js";
/// Its pinned version.
pub const COMPONENTIZE_JS_VERSION: &str = "0.23.0";
/// The PyPI package that builds Python rules.
pub const COMPONENTIZE_PY: &str = "componentize-py";
/// Its pinned version (`guest/python/requirements.txt`, and new Python projects').
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
/// Names a `componentize-py` other than the one found next to the project.
pub const COMPONENTIZE_PY_ENV: &str = "TURNSTILE_COMPONENTIZE_PY";
/// The Python module a Python rule project's rule lives in (`app.py`, class `WitWorld`).
pub const PYTHON_APP_MODULE: &str = "app";

/// The languages a rule project can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// A crate (`Cargo.toml`), built for `wasm32-unknown-unknown` and wrapped by `wit-component`.
    Rust,
    /// An npm package (`package.json`) whose `build` script runs `componentize-js`.
    JavaScript,
    /// A directory with `app.py` (and usually `pyproject.toml`), built by `componentize-py`.
    Python,
}

impl Language {
    /// The language of the project in `dir`, from the file that marks it; `None` when no marker
    /// is there.
    pub fn detect(dir: &Path) -> Option<Language> {
        if dir.join("Cargo.toml").is_file() {
            Some(Language::Rust)
        } else if dir.join("package.json").is_file() {
            Some(Language::JavaScript)
        } else if dir.join("pyproject.toml").is_file() || dir.join("app.py").is_file() {
            Some(Language::Python)
        } else {
            None
        }
    }

    /// The name users type (`--lang`).
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::JavaScript => "js",
            Language::Python => "python",
        }
    }
}

/// The WIT directory a JavaScript or Python rule is built against: the project's own `wit/`
/// (vendored by `turnstile new`), else the nearest ancestor's `wit/` (this repository's).
pub fn find_wit(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .map(|d| d.join("wit"))
        .find(|wit| wit.join("rule.wit").is_file())
}

/// Builds the JavaScript rule in `dir` into `out` by running its `build` script
/// (`npm run --silent build -- --out OUT`), which turns the module into a component with
/// `componentize-js`. `quiet` captures the toolchain's output and puts it in the error instead.
pub fn build_javascript(dir: &Path, out: &Path, quiet: bool) -> Result<()> {
    let manifest_path = dir.join("package.json");
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    if !manifest.contains("\"build\"") {
        bail!(
            "{} has no `build` script; it should run `node sdk/build.mjs .` (see `turnstile new --lang js`)",
            manifest_path.display()
        );
    }
    let mut command = Command::new("npm");
    command
        .args(["run", "--silent", "build", "--", "--out"])
        .arg(out)
        .current_dir(dir);
    run_toolchain(command, quiet, "npm", || {
        "npm (Node.js 18 or newer) is not installed; install Node.js, then `npm install` in the rule's directory".into()
    })
    .with_context(|| format!("building the JavaScript rule in {}", dir.display()))
}

/// Finds `componentize-py`: `$TURNSTILE_COMPONENTIZE_PY`, else the project's `.venv`, else
/// `PATH`. The error says how to install the pinned version.
pub fn find_componentize_py(dir: &Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(COMPONENTIZE_PY_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let in_venv = dir.join(".venv/bin/componentize-py");
    if in_venv.is_file() {
        return Ok(in_venv);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("componentize-py"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    on_path.with_context(|| {
        format!(
            "{COMPONENTIZE_PY} is not installed: run `python3 -m venv .venv && .venv/bin/pip install {COMPONENTIZE_PY}=={COMPONENTIZE_PY_VERSION}` in {}, or put it on PATH, or set {COMPONENTIZE_PY_ENV}",
            dir.display()
        )
    })
}

/// Builds the Python rule in `dir` (module `app`, class `WitWorld`) into `out` with
/// `componentize-py`, against the WIT [`find_wit`] finds; the bindings (`wit_world`) are generated
/// from that WIT during the build. `quiet` as for [`build_javascript`].
pub fn build_python(dir: &Path, out: &Path, componentize_py: &Path, quiet: bool) -> Result<()> {
    let app = dir.join(format!("{PYTHON_APP_MODULE}.py"));
    if !app.is_file() {
        bail!(
            "{} does not exist; a Python rule is the class `WitWorld` in `app.py`",
            app.display()
        );
    }
    let wit = find_wit(dir)
        .with_context(|| format!("no wit/rule.wit in {} or above it", dir.display()))?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // componentize-py runs the app at build time and leaves `__pycache__/` beside its sources:
    // it builds a copy, so the project (watched by build scripts) is not changed by its build.
    let staged = std::env::temp_dir().join(format!(
        "turnstile-python-rule-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    copy_sources(dir, &staged)?;
    let mut command = Command::new(componentize_py);
    command
        .arg("--wit-path")
        .arg(&wit)
        .args([
            "--world",
            "rule",
            "--quiet",
            "componentize",
            "--python-path",
        ])
        .arg(&staged)
        .arg(PYTHON_APP_MODULE)
        .arg("--output")
        .arg(out)
        .current_dir(&staged)
        // componentize-py adds a virtualenv's site-packages from the environment; a rule's code
        // is its directory alone, whatever shell it is built from.
        .env_remove("VIRTUAL_ENV");
    let program = componentize_py.display().to_string();
    let built = run_toolchain(command, quiet, &program, || {
        format!(
            "{program} cannot be run; install {COMPONENTIZE_PY}=={COMPONENTIZE_PY_VERSION} (`pip install {COMPONENTIZE_PY}=={COMPONENTIZE_PY_VERSION}`)"
        )
    });
    let _ = std::fs::remove_dir_all(&staged);
    built.with_context(|| format!("building the Python rule in {}", dir.display()))
}

/// Copies a rule project's sources from `from` into `to`, without what is not source: hidden
/// entries (`.venv`, `.git`), `target/`, `node_modules/` and `__pycache__/`. Also stages Rust
/// crates for `turnstile build`.
pub fn copy_sources(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with('.') || ["target", "node_modules", "__pycache__"].contains(&&*text) {
            continue;
        }
        let (source, dest) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_sources(&source, &dest)?;
        } else {
            std::fs::copy(&source, &dest)
                .with_context(|| format!("copying {}", source.display()))?;
        }
    }
    Ok(())
}

/// Runs a toolchain command; a missing program gives `missing()`, a failure its output (when
/// captured) and exit status.
fn run_toolchain(
    mut command: Command,
    quiet: bool,
    program: &str,
    missing: impl FnOnce() -> String,
) -> Result<()> {
    if quiet {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else {
        // The toolchain's progress goes to stderr, keeping stdout for the build's own lines.
        command.stdout(std::io::stderr()).stderr(Stdio::inherit());
    }
    let output: Output = match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{}", missing()),
        Err(e) => return Err(e).with_context(|| format!("running {program}")),
    };
    if !output.status.success() {
        let captured = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let captured = captured.trim_end();
        bail!(
            "{program} failed ({}){}{captured}",
            output.status,
            if captured.is_empty() { "" } else { ":\n" },
        );
    }
    Ok(())
}
