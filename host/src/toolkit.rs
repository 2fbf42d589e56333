//! The rule author's toolkit: `turnstile new` (a self-contained rule project), `turnstile build`
//! (crate → component) and `turnstile check` (would this component be accepted, and what is it).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::Config;
use crate::sandbox::{CompiledRule, RuleLimits, Sandbox};

/// What `turnstile build` produced.
#[derive(Debug)]
pub struct Built {
    /// The component file.
    pub path: PathBuf,
    /// The checked rule.
    pub rule: CompiledRule,
}

/// How `turnstile build` builds.
#[derive(Debug, Default, Clone)]
pub struct BuildOptions {
    /// Keep function names and panic locations, for backtraces that name the rule's functions.
    pub debug: bool,
    /// Cargo's target dir; `None`: `CARGO_TARGET_DIR`, else `<crate>/target`.
    pub target_dir: Option<PathBuf>,
    /// Copy the component here too.
    pub out: Option<PathBuf>,
}

/// Builds the rule crate in `crate_dir` into a component under `<target-dir>/components` and
/// checks it against the world and `config`'s limits, exactly as `run` would.
pub fn build(crate_dir: &Path, config: &Config, options: &BuildOptions) -> anyhow::Result<Built> {
    let manifest_path = crate_dir.join("Cargo.toml");
    if !manifest_path.exists() {
        bail!(
            "{} has no Cargo.toml; point `turnstile build` at a rule crate",
            crate_dir.display()
        );
    }
    refuse_workspace_root(&manifest_path)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = match &options.target_dir {
        Some(dir) => dir.clone(),
        None => match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => crate_dir.join("target"),
        },
    };
    let build = turnstile_guest_build::GuestBuild {
        manifest_path,
        target_dir,
        cargo: cargo.into(),
        quiet: false,
    };
    let crate_dir = std::path::absolute(crate_dir)
        .with_context(|| format!("resolving {}", crate_dir.display()))?;
    let built = build
        .build_with(
            &[],
            &turnstile_guest_build::BuildOptions {
                debug: options.debug,
                remap_path_prefixes: reproducible_path_prefixes(&crate_dir),
            },
        )?
        .remove(0);
    let bytes =
        std::fs::read(&built.path).with_context(|| format!("reading {}", built.path.display()))?;
    let path = match &options.out {
        Some(out) => {
            std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            out.clone()
        }
        None => built.path,
    };
    let rule = check_bytes(&bytes, config)
        .with_context(|| format!("{} would be refused", path.display()))?;
    Ok(Built { path, rule })
}

/// Path prefixes that differ from one machine or checkout to another and end up in the wasm (in
/// panic locations and, with `--debug`, names): each is rewritten to a fixed name, so the same
/// source and lock file give the same bytes, hence the same version id, wherever they are built.
fn reproducible_path_prefixes(crate_dir: &Path) -> Vec<(PathBuf, String)> {
    let mut prefixes = vec![(crate_dir.to_path_buf(), "/rule".to_string())];
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        prefixes.push((home, "/cargo".to_string()));
    }
    prefixes
}

/// A virtual workspace manifest builds every member before anything can be checked; say so at
/// once, with the members to point at instead.
fn refuse_workspace_root(manifest_path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", manifest_path.display()))?;
    if manifest.contains_key("package") {
        return Ok(());
    }
    let members: Vec<String> = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .map(|m| {
            m.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if members.is_empty() {
        bail!(
            "{} has no [package]; point `turnstile build` at a rule crate",
            manifest_path.display()
        );
    }
    bail!(
        "{} is a workspace root, not a rule crate; build one member instead: {}",
        manifest_path.display(),
        members.join(", ")
    )
}

/// `turnstile new`'s project files, and the SDK it vendors so the project needs no checkout.
mod template {
    pub const CARGO_TOML: &str = include_str!("../templates/new/Cargo.toml.in");
    pub const LIB_RS: &str = include_str!("../templates/new/lib.rs.in");
    pub const SCENARIOS: &str = include_str!("../templates/new/scenarios.toml");
    pub const README: &str = include_str!("../templates/new/README.md.in");
    pub const GITIGNORE: &str = include_str!("../templates/new/gitignore");
    pub const SDK_CARGO_TOML: &str = include_str!("../templates/new/sdk-Cargo.toml.in");
    pub const SDK_LIB_RS: &str = include_str!("../../guest/src/lib.rs");
    pub const WIT: &str = include_str!("../../wit/rule.wit");
    /// The wit-bindgen the SDK is built with in this repository (kept equal by a test).
    pub const WIT_BINDGEN_VERSION: &str = "0.61";
}

/// Creates a self-contained rule project in `dir` (which must not exist): a rule crate whose
/// package name is the directory's name, a scenario file, a README, and the SDK vendored under
/// `sdk/`. Returns the package name.
pub fn new_project(dir: &Path) -> anyhow::Result<String> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the new project needs a directory name")?
        .to_string();
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!(
            "`{name}` is not a usable rule name: use lowercase letters, digits, `-` and `_`, starting with a letter"
        );
    }
    if name == "turnstile-rule" || name == "turnstile_rule" {
        bail!("`{name}` is the SDK's own name; pick another");
    }
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let type_name: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect();
    let fill = |text: &str| {
        text.replace("{name}", &name)
            .replace("{type_name}", &type_name)
            .replace("{turnstile_version}", env!("CARGO_PKG_VERSION"))
            .replace("{wit_bindgen_version}", template::WIT_BINDGEN_VERSION)
    };
    // In this repository the SDK finds the WIT one level up; in the project it sits beside it.
    let sdk_lib = template::SDK_LIB_RS.replace("path: \"../wit\"", "path: \"wit\"");
    let files: [(&str, String); 8] = [
        ("Cargo.toml", fill(template::CARGO_TOML)),
        ("src/lib.rs", fill(template::LIB_RS)),
        ("scenarios.toml", template::SCENARIOS.to_string()),
        ("README.md", fill(template::README)),
        (".gitignore", template::GITIGNORE.to_string()),
        ("sdk/Cargo.toml", fill(template::SDK_CARGO_TOML)),
        ("sdk/src/lib.rs", sdk_lib),
        ("sdk/wit/rule.wit", template::WIT.to_string()),
    ];
    for (relative, text) in files {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(name)
}

/// Checks a component file as `run` and the admin API would, without starting anything.
pub fn check(path: &Path, config: &Config) -> anyhow::Result<CompiledRule> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    check_bytes(&bytes, config).with_context(|| format!("{} would be refused", path.display()))
}

fn check_bytes(bytes: &[u8], config: &Config) -> anyhow::Result<CompiledRule> {
    let sandbox = Sandbox::new(RuleLimits::from(&config.rule))?;
    Ok(sandbox.compile(bytes)?)
}
