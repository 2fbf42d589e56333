//! The rule author's toolkit: `turnstile build` (crate → component) and `turnstile check`
//! (would this component be accepted, and what is it).

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

/// Builds the rule crate in `crate_dir` into a component under `<crate_dir>/target/components`
/// and checks it against the world and `config`'s limits, exactly as `run` would.
pub fn build(crate_dir: &Path, config: &Config) -> anyhow::Result<Built> {
    let manifest_path = crate_dir.join("Cargo.toml");
    if !manifest_path.exists() {
        bail!(
            "{} has no Cargo.toml; point `turnstile build` at a rule crate",
            crate_dir.display()
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = turnstile_guest_build::GuestBuild {
        manifest_path,
        target_dir: crate_dir.join("target"),
        cargo: cargo.into(),
        quiet: false,
    };
    let built = build.build(&[])?.remove(0);
    let bytes =
        std::fs::read(&built.path).with_context(|| format!("reading {}", built.path.display()))?;
    let rule = check_bytes(&bytes, config)
        .with_context(|| format!("{} would be refused", built.path.display()))?;
    Ok(Built {
        path: built.path,
        rule,
    })
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
