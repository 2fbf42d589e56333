//! The rule author's toolkit: `turnstile new` (a self-contained rule project in Rust, JavaScript
//! or Python), `turnstile build` (project → component, in the project's language) and
//! `turnstile check` (would this component be accepted, and what is it).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use turnstile_guest_build::languages;
pub use turnstile_guest_build::languages::Language;

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

/// Builds the rule project in `crate_dir` (a Rust crate, or a JavaScript or Python project: see
/// [`Language::detect`]) into a component under `<target-dir>/components` and checks it against
/// the world and `config`'s limits, exactly as `run` would.
pub fn build(crate_dir: &Path, config: &Config, options: &BuildOptions) -> anyhow::Result<Built> {
    match Language::detect(crate_dir) {
        Some(language @ (Language::JavaScript | Language::Python)) => {
            return build_interpreted(crate_dir, language, config, options);
        }
        Some(Language::Rust) => {}
        None if crate_dir.is_dir() => bail!(
            "{} is no rule project: it has no Cargo.toml (Rust), package.json (JavaScript) or pyproject.toml / app.py (Python)",
            crate_dir.display()
        ),
        None if crate_dir.exists() => bail!(
            "{} is a file, not a rule project directory",
            crate_dir.display()
        ),
        None => bail!("{} does not exist", crate_dir.display()),
    }
    let manifest_path = crate_dir.join("Cargo.toml");
    refuse_workspace_root(&manifest_path)?;
    let cargo: PathBuf = std::env::var_os("CARGO")
        .unwrap_or_else(|| "cargo".into())
        .into();
    let target_dir = target_dir(crate_dir, options);
    let crate_dir = std::path::absolute(crate_dir)
        .with_context(|| format!("resolving {}", crate_dir.display()))?;
    let target_dir = std::path::absolute(&target_dir)
        .with_context(|| format!("resolving {}", target_dir.display()))?;
    // A member of another workspace is built as a workspace of its own (a staged copy): cargo's
    // hashes include a crate's path in its workspace, and they decide the order of the code.
    let (source_dir, path_in_workspace) = match workspace_membership(&cargo, &crate_dir)? {
        Some(member) => match stage_as_own_workspace(&crate_dir, &member, &target_dir)? {
            Some(staged) => (staged, None),
            None => (crate_dir.clone(), Some(member.relative)),
        },
        None => (crate_dir.clone(), None),
    };
    let build = turnstile_guest_build::GuestBuild {
        manifest_path: source_dir.join("Cargo.toml"),
        target_dir,
        cargo: cargo.clone(),
        quiet: false,
    };
    let built = build
        .build_with(
            &[],
            &turnstile_guest_build::BuildOptions {
                debug: options.debug,
                remap_path_prefixes: reproducible_path_prefixes(&source_dir, path_in_workspace),
            },
        )?
        .remove(0);
    finish(built.path, config, options)
}

/// `--target-dir`, else `$CARGO_TARGET_DIR`, else `<project>/target`.
fn target_dir(project_dir: &Path, options: &BuildOptions) -> PathBuf {
    match &options.target_dir {
        Some(dir) => dir.clone(),
        None => match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => project_dir.join("target"),
        },
    }
}

/// Builds a JavaScript or Python rule with its language's pinned toolchain into
/// `<target-dir>/components/<directory name>.wasm`.
fn build_interpreted(
    project_dir: &Path,
    language: Language,
    config: &Config,
    options: &BuildOptions,
) -> anyhow::Result<Built> {
    let project_dir = std::path::absolute(project_dir)
        .with_context(|| format!("resolving {}", project_dir.display()))?;
    let name = project_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the rule project needs a directory name")?
        .to_string();
    if options.debug {
        eprintln!(
            "note: --debug applies to Rust rules; a {} rule's component keeps its source names anyway",
            language.name()
        );
    }
    let target_dir = std::path::absolute(target_dir(&project_dir, options))
        .context("resolving the target dir")?;
    let path = target_dir.join("components").join(format!("{name}.wasm"));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match language {
        Language::JavaScript => languages::build_javascript(&project_dir, &path, false)?,
        Language::Python => {
            let componentize_py = languages::find_componentize_py(&project_dir)?;
            languages::build_python(&project_dir, &path, &componentize_py, false)?;
        }
        Language::Rust => unreachable!("Rust rules are built by cargo"),
    }
    finish(path, config, options)
}

/// Copies the component built at `built_path` to `--out` (when given) and checks it.
fn finish(built_path: PathBuf, config: &Config, options: &BuildOptions) -> anyhow::Result<Built> {
    let bytes =
        std::fs::read(&built_path).with_context(|| format!("reading {}", built_path.display()))?;
    let path = match &options.out {
        Some(out) => {
            std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            out.clone()
        }
        None => built_path,
    };
    let rule = check_bytes(&bytes, config)
        .with_context(|| format!("{} would be refused", path.display()))?;
    Ok(Built { path, rule })
}

/// Path prefixes that differ from one machine or checkout to another and end up in the wasm (in
/// panic locations and, with `--debug`, names): each is rewritten to a fixed name, so the same
/// source and lock file give the same bytes, hence the same version id, wherever they are built.
///
/// A crate that is a member of another workspace is compiled from the workspace root, with its
/// sources named relative to it (`rules/mine/src/lib.rs`, where a crate of its own has
/// `src/lib.rs`): that relative prefix is removed too, so both give the same version id.
fn reproducible_path_prefixes(
    crate_dir: &Path,
    path_in_workspace: Option<PathBuf>,
) -> Vec<(PathBuf, String)> {
    let mut prefixes = vec![(crate_dir.to_path_buf(), "/rule".to_string())];
    if let Some(relative) = path_in_workspace {
        prefixes.push((relative, String::new()));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        prefixes.push((home, "/cargo".to_string()));
    }
    prefixes
}

/// A rule crate that is a member of another workspace.
struct Membership {
    /// The workspace's root directory.
    root: PathBuf,
    /// Where the crate lies in it (`rules/mine`).
    relative: PathBuf,
}

/// Copies a member crate (without `target/` and hidden directories) under
/// `<target-dir>/staged/`, makes the copy a workspace of its own with the workspace's lock file,
/// and returns its directory. Returns none, after saying why, when the crate cannot be built
/// alone: it inherits from the workspace (`.workspace = true`) or has path dependencies outside
/// its directory; it is then built in place, and its version id may differ from a crate of its
/// own.
fn stage_as_own_workspace(
    crate_dir: &Path,
    member: &Membership,
    target_dir: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    let manifest_path = crate_dir.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let compact: String = manifest.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.contains("workspace=true") || compact.contains("path=\"..") {
        eprintln!(
            "note: {} inherits from its workspace or uses paths outside its directory: built in place, its version id may differ from the same rule built as a crate of its own",
            crate_dir.display()
        );
        return Ok(None);
    }
    let name = crate_dir
        .file_name()
        .context("the crate needs a directory name")?;
    let staged = target_dir.join("staged").join(name);
    if staged.exists() {
        std::fs::remove_dir_all(&staged)
            .with_context(|| format!("clearing {}", staged.display()))?;
    }
    turnstile_guest_build::languages::copy_sources(crate_dir, &staged)?;
    std::fs::write(
        staged.join("Cargo.toml"),
        format!("{manifest}\n# Staged by `turnstile build`: built as a workspace of its own.\n[workspace]\n"),
    )
    .with_context(|| format!("writing {}", staged.display()))?;
    let lock = member.root.join("Cargo.lock");
    if lock.exists() {
        std::fs::copy(&lock, staged.join("Cargo.lock"))
            .with_context(|| format!("copying {}", lock.display()))?;
    }
    Ok(Some(staged))
}

/// The workspace `crate_dir` belongs to, when its root is another directory (the crate is a
/// member of another workspace).
fn workspace_membership(cargo: &Path, crate_dir: &Path) -> anyhow::Result<Option<Membership>> {
    let output = std::process::Command::new(cargo)
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .output()
        .with_context(|| format!("running {} locate-project", cargo.display()))?;
    if !output.status.success() {
        bail!(
            "cargo could not find the workspace of {}: {}",
            crate_dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let manifest = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let canonical = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.into());
    let (Some(root), crate_dir) = (manifest.parent().map(canonical), canonical(crate_dir)) else {
        return Ok(None);
    };
    Ok(crate_dir
        .strip_prefix(&root)
        .ok()
        .filter(|relative| !relative.as_os_str().is_empty())
        .map(|relative| Membership {
            relative: relative.to_path_buf(),
            root: root.clone(),
        }))
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

    /// A JavaScript project: the npm package, its rule module, and the JS SDK (build script and
    /// types generated from the WIT) vendored under `sdk/`.
    pub mod js {
        pub const PACKAGE_JSON: &str = include_str!("../templates/new-js/package.json.in");
        pub const RULE_JS: &str = include_str!("../templates/new-js/rule.js");
        pub const README: &str = include_str!("../templates/new-js/README.md.in");
        pub const GITIGNORE: &str = include_str!("../templates/new-js/gitignore");
        pub const BUILD_MJS: &str = include_str!("../../guest/js/build.mjs");
        pub const RULE_D_TS: &str = include_str!("../../guest/js/types/rule.d.ts");
        pub const LOG_D_TS: &str = include_str!("../../guest/js/types/log.d.ts");
        pub const TYPES_D_TS: &str =
            include_str!("../../guest/js/types/interfaces/turnstile-rule-types.d.ts");
    }

    /// A Python project: `app.py`, and the pinned toolchain in `requirements.txt`.
    pub mod python {
        pub const APP_PY: &str = include_str!("../templates/new-python/app.py.in");
        pub const PYPROJECT: &str = include_str!("../templates/new-python/pyproject.toml.in");
        pub const REQUIREMENTS: &str = include_str!("../templates/new-python/requirements.txt.in");
        pub const README: &str = include_str!("../templates/new-python/README.md.in");
        pub const GITIGNORE: &str = include_str!("../templates/new-python/gitignore");
    }
}

/// Creates a self-contained rule project in `dir` (which must not exist), in `language`: the
/// rule (package name: the directory's name), a scenario file, a README, and what the project
/// needs to build with no checkout (the Rust SDK under `sdk/`; the JS build script and types
/// under `sdk/`; the WIT). Returns the name.
pub fn new_project(dir: &Path, language: Language) -> anyhow::Result<String> {
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
            .replace("{componentize_js}", languages::COMPONENTIZE_JS)
            .replace(
                "{componentize_js_version}",
                languages::COMPONENTIZE_JS_VERSION,
            )
            .replace("{componentize_py}", languages::COMPONENTIZE_PY)
            .replace(
                "{componentize_py_version}",
                languages::COMPONENTIZE_PY_VERSION,
            )
    };
    let files: Vec<(&str, String)> = match language {
        Language::Rust => {
            // In this repository the SDK finds the WIT one level up; in the project it sits beside it.
            let sdk_lib = template::SDK_LIB_RS.replace("path: \"../wit\"", "path: \"wit\"");
            vec![
                ("Cargo.toml", fill(template::CARGO_TOML)),
                ("src/lib.rs", fill(template::LIB_RS)),
                ("README.md", fill(template::README)),
                (".gitignore", template::GITIGNORE.to_string()),
                ("sdk/Cargo.toml", fill(template::SDK_CARGO_TOML)),
                ("sdk/src/lib.rs", sdk_lib),
                ("sdk/wit/rule.wit", template::WIT.to_string()),
            ]
        }
        Language::JavaScript => vec![
            ("package.json", fill(template::js::PACKAGE_JSON)),
            ("rule.js", template::js::RULE_JS.to_string()),
            ("README.md", fill(template::js::README)),
            (".gitignore", template::js::GITIGNORE.to_string()),
            ("sdk/build.mjs", template::js::BUILD_MJS.to_string()),
            ("sdk/types/rule.d.ts", template::js::RULE_D_TS.to_string()),
            ("sdk/types/log.d.ts", template::js::LOG_D_TS.to_string()),
            (
                "sdk/types/interfaces/turnstile-rule-types.d.ts",
                template::js::TYPES_D_TS.to_string(),
            ),
            ("wit/rule.wit", template::WIT.to_string()),
        ],
        Language::Python => vec![
            ("app.py", fill(template::python::APP_PY)),
            ("pyproject.toml", fill(template::python::PYPROJECT)),
            ("requirements.txt", fill(template::python::REQUIREMENTS)),
            ("README.md", fill(template::python::README)),
            (".gitignore", template::python::GITIGNORE.to_string()),
            ("wit/rule.wit", template::WIT.to_string()),
        ],
    };
    let scenarios = ("scenarios.toml", template::SCENARIOS.to_string());
    for (relative, text) in files.into_iter().chain([scenarios]) {
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
