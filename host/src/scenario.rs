//! `turnstile test`: scenario files that test a rule exactly as production runs it.
//!
//! A scenario file is TOML:
//!
//! ```toml
//! # Optional: overrides of the production settings for every scenario in this file.
//! [settings]
//! servers = 1          # partitions.servers
//! containers = 4       # partitions.containers
//! hash = "java"        # partitions.hash
//! fuel = 10000000      # rule.fuel
//! deadline_ms = 100    # rule.deadline_ms
//! max_memory_bytes = 16777216
//! max_output_bytes = 65536
//! route_ttl_seconds = 86400
//!
//! [[scenario]]
//! name = "reserve then associate by user"
//!
//! [[scenario.step]]
//! kind = "reserve"                 # request fields: kind, user, key?, payload?, id?
//! key = "R-1"
//! user = "alice"
//! at_ms = 1000                     # the request time the rule sees (default: 1000 × step number)
//! expect = "transition"            # "transition", "reject" or "error"
//! status = "reserved"              # transition: the new status
//! version = 1                      # transition: the new version
//! data = { reserved_at_ms = 1000 } # transition: fields the data must have (others may exist)
//!
//! [[scenario.step]]
//! kind = "associate"
//! user = "bob"
//! expect = "error"
//! code = "unknown_route"           # error: the API error code (rule_trap, unknown_route, ...)
//! ```
//!
//! A reject step may give `reason`, a substring the reason must contain. Each scenario runs in a
//! fresh in-memory runtime with the production routing, route cache and sandbox limits, so what
//! passes here behaves the same under `turnstile run`. A scenario stops at its first failing step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

use crate::config::Config;
use crate::model::{Request, Verdict};
use crate::runtime::Runtime;
use crate::sandbox::{RuleLimits, Sandbox};

/// A scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Overrides of the production settings.
    #[serde(default)]
    pub settings: Settings,
    /// The scenarios.
    #[serde(default, rename = "scenario")]
    pub scenarios: Vec<Scenario>,
}

/// `[settings]` of a scenario file: what may differ from the production configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    servers: Option<u32>,
    containers: Option<u32>,
    hash: Option<crate::router::HashKind>,
    fuel: Option<u64>,
    deadline_ms: Option<u64>,
    max_memory_bytes: Option<usize>,
    max_output_bytes: Option<usize>,
    route_ttl_seconds: Option<u64>,
}

/// One scenario: steps run in order against one fresh runtime.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name, shown in the output.
    pub name: String,
    /// The steps.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
}

/// One request and what it must produce.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    kind: String,
    user: String,
    key: Option<String>,
    payload: Option<toml::Value>,
    id: Option<String>,
    at_ms: Option<u64>,
    expect: Expect,
    status: Option<String>,
    version: Option<u64>,
    data: Option<toml::Table>,
    reason: Option<String>,
    code: Option<String>,
}

/// The outcome a step expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Transition,
    Reject,
    Error,
}

/// What a step produced.
#[derive(Debug, Clone)]
enum Actual {
    Transition {
        key: String,
        status: String,
        version: u64,
        data: Value,
    },
    Reject {
        key: String,
        reason: String,
    },
    Error {
        code: String,
        message: String,
    },
}

impl Actual {
    fn label(&self) -> String {
        match self {
            Actual::Transition { status, .. } => format!("transition → {status}"),
            Actual::Reject { .. } => "reject".into(),
            Actual::Error { code, .. } => format!("error {code}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Actual::Transition {
                key,
                status,
                version,
                data,
            } => format!(
                "transition of {key} to {status:?} (version {version}), data {}",
                terminal_safe(&data.to_string())
            ),
            Actual::Reject { key, reason } => {
                format!("reject of {key}: \"{}\"", terminal_safe(reason))
            }
            Actual::Error { code, message } => format!("error {code}: {message}"),
        }
    }
}

/// The result of one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// The file it came from.
    pub file: PathBuf,
    /// Its name.
    pub name: String,
    /// `None` if it passed; else what went wrong, ready to print.
    pub failure: Option<String>,
    /// Seconds it took.
    pub seconds: f64,
}

/// Which (status before, kind) pairs the scenarios exercised, and the outcomes seen for each.
pub type Coverage = BTreeMap<(String, String), BTreeSet<String>>;

/// Everything `turnstile test` found.
#[derive(Debug, Default)]
pub struct Report {
    /// One entry per scenario, in file order.
    pub results: Vec<ScenarioResult>,
    /// Transition coverage over all scenarios.
    pub coverage: Coverage,
}

impl Report {
    /// Scenarios that passed.
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }

    /// Scenarios that failed.
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

/// Reads and parses a scenario file.
pub fn load(path: &Path) -> anyhow::Result<ScenarioFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: ScenarioFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    if file.scenarios.is_empty() {
        anyhow::bail!("{} has no [[scenario]]", path.display());
    }
    Ok(file)
}

/// Runs every scenario of `files` against the rule component `rule_bytes`, printing one line per
/// scenario through `out` as it goes.
pub fn run(
    rule_bytes: &[u8],
    files: &[PathBuf],
    base: &Config,
    out: &mut dyn FnMut(&str),
) -> anyhow::Result<Report> {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = Report::default();
    for path in files {
        let file = load(path)?;
        let config = apply(base, &file.settings)?;
        let sandbox = Sandbox::new(RuleLimits::from(&config.rule))?;
        // Refuse a bad component once, with the loader's message, not once per scenario.
        sandbox
            .compile_shared(rule_bytes)
            .context("the rule would be refused")?;
        out(&format!(
            "running {} scenarios from {}",
            file.scenarios.len(),
            path.display()
        ));
        for scenario in &file.scenarios {
            let started = Instant::now();
            let failure = tokio.block_on(run_scenario(
                &config,
                &sandbox,
                rule_bytes,
                scenario,
                &mut report.coverage,
            ))?;
            out(&format!(
                "scenario {} ... {}",
                scenario.name,
                if failure.is_none() { "ok" } else { "FAILED" }
            ));
            report.results.push(ScenarioResult {
                file: path.clone(),
                name: scenario.name.clone(),
                failure,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }
    Ok(report)
}

fn apply(base: &Config, settings: &Settings) -> anyhow::Result<Config> {
    let mut config = base.clone();
    config.store.data_dir = None;
    config.rule.watch = false;
    let s = settings;
    if let Some(v) = s.servers {
        config.partitions.servers = v;
    }
    if let Some(v) = s.containers {
        config.partitions.containers = v;
    }
    if let Some(v) = s.hash {
        config.partitions.hash = v;
    }
    if let Some(v) = s.fuel {
        config.rule.fuel = v;
    }
    if let Some(v) = s.deadline_ms {
        config.rule.deadline_ms = v;
    }
    if let Some(v) = s.max_memory_bytes {
        config.rule.max_memory_bytes = v;
    }
    if let Some(v) = s.max_output_bytes {
        config.rule.max_output_bytes = v;
    }
    if let Some(v) = s.route_ttl_seconds {
        config.routes.ttl_seconds = v;
    }
    config.validate()?;
    Ok(config)
}

/// Runs one scenario; `Ok(None)` if it passed, `Ok(Some(why))` if a step failed.
async fn run_scenario(
    config: &Config,
    sandbox: &Arc<Sandbox>,
    rule_bytes: &[u8],
    scenario: &Scenario,
    coverage: &mut Coverage,
) -> anyhow::Result<Option<String>> {
    let runtime = Runtime::start_in(config, sandbox.clone(), Some(rule_bytes.to_vec()))?;
    for (i, step) in scenario.steps.iter().enumerate() {
        let number = i + 1;
        let at_ms = step.at_ms.unwrap_or(1000 * number as u64);
        let before = match &step.key {
            Some(key) => runtime.key_state(key).await?.1,
            None => runtime
                .user_at(&step.user, at_ms)
                .await?
                .and_then(|v| v.state),
        };
        let request = Request {
            id: step.id.clone(),
            kind: step.kind.clone(),
            key: step.key.clone(),
            user: step.user.clone(),
            payload: step
                .payload
                .as_ref()
                .map(|p| serde_json::to_string(p).expect("TOML values are JSON")),
        };
        let actual = match runtime.submit_at(request, at_ms).await {
            Ok(decision) => match decision.verdict {
                Verdict::Transition(state) => Actual::Transition {
                    key: decision.key,
                    status: state.status,
                    version: state.version,
                    data: serde_json::from_str(&state.data).unwrap_or(Value::Null),
                },
                Verdict::Reject(reason) => Actual::Reject {
                    key: decision.key,
                    reason,
                },
            },
            Err(e) => Actual::Error {
                code: e.code().to_string(),
                message: e.to_string(),
            },
        };
        let from = before.map_or_else(|| "none".to_string(), |s| s.status);
        coverage
            .entry((from, step.kind.clone()))
            .or_default()
            .insert(actual.label());
        let mismatches = compare(step, &actual);
        if !mismatches.is_empty() {
            let mut text = format!(
                "step {number}: {} {}by {}\n  actual: {}\n",
                step.kind,
                step.key.as_ref().map_or(String::new(), |k| format!("{k} ")),
                step.user,
                actual.describe()
            );
            for line in mismatches {
                text.push_str(&format!("  {line}\n"));
            }
            return Ok(Some(text));
        }
    }
    Ok(None)
}

/// Lines of `- expected` / `+ actual` for every expectation the step's result misses.
fn compare(step: &Step, actual: &Actual) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |what: &str, expected: String, actual: String| {
        out.push(format!(
            "{what}:\n    - expected {expected}\n    + actual   {actual}"
        ));
    };
    let expected_outcome = match step.expect {
        Expect::Transition => "transition",
        Expect::Reject => "reject",
        Expect::Error => "error",
    };
    let actual_outcome = match actual {
        Actual::Transition { .. } => "transition",
        Actual::Reject { .. } => "reject",
        Actual::Error { .. } => "error",
    };
    if expected_outcome != actual_outcome {
        differ("outcome", expected_outcome.into(), actual_outcome.into());
        return out;
    }
    match actual {
        Actual::Transition {
            status,
            version,
            data,
            ..
        } => {
            if let Some(expected) = &step.status
                && expected != status
            {
                differ("status", format!("{expected:?}"), format!("{status:?}"));
            }
            if let Some(expected) = step.version
                && expected != *version
            {
                differ("version", expected.to_string(), version.to_string());
            }
            if let Some(fields) = &step.data {
                for (name, expected) in fields {
                    let expected = serde_json::to_value(expected).expect("TOML is JSON");
                    let got = data.get(name).cloned().unwrap_or(Value::Null);
                    if got != expected {
                        differ(
                            &format!("data.{name}"),
                            expected.to_string(),
                            terminal_safe(&got.to_string()),
                        );
                    }
                }
            }
        }
        Actual::Reject { reason, .. } => {
            if let Some(expected) = &step.reason
                && !reason.contains(expected.as_str())
            {
                differ(
                    "reason",
                    format!("containing {expected:?}"),
                    format!("\"{}\"", terminal_safe(reason)),
                );
            }
        }
        Actual::Error { code, .. } => {
            if let Some(expected) = &step.code
                && expected != code
            {
                differ("code", expected.clone(), code.clone());
            }
        }
    }
    out
}

/// What a rule returned, made safe for the terminal: control and bidi characters escaped (a
/// rule must not be able to rewrite the report a reviewer reads), cut at 64 KiB.
fn terminal_safe(text: &str) -> String {
    crate::sandbox::escape_untrusted(text, 64 * 1024)
}

/// The coverage table, one line per (status before, kind).
pub fn coverage_lines(coverage: &Coverage) -> Vec<String> {
    let width = coverage
        .keys()
        .map(|(from, kind)| from.len() + kind.len() + 4)
        .max()
        .unwrap_or(0);
    coverage
        .iter()
        .map(|((from, kind), outcomes)| {
            let pair = format!("({from}, {kind})");
            format!(
                "  {pair:<width$} → {}",
                outcomes.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect()
}

/// The report as JUnit XML, for CI systems.
pub fn junit(report: &Report) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    xml.push_str(&format!(
        "<testsuites name=\"turnstile test\" tests=\"{}\" failures=\"{}\">\n",
        report.results.len(),
        report.failed()
    ));
    let mut files: Vec<&PathBuf> = report.results.iter().map(|r| &r.file).collect();
    files.dedup();
    for file in files {
        let results: Vec<&ScenarioResult> =
            report.results.iter().filter(|r| &r.file == file).collect();
        let failures = results.iter().filter(|r| r.failure.is_some()).count();
        let time: f64 = results.iter().map(|r| r.seconds).sum();
        xml.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" time=\"{time:.3}\">\n",
            escape(&file.display().to_string()),
            results.len()
        ));
        for r in results {
            xml.push_str(&format!(
                "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\"",
                escape(&r.name),
                escape(&file.display().to_string()),
                r.seconds
            ));
            match &r.failure {
                None => xml.push_str("/>\n"),
                Some(why) => xml.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    escape(why.lines().next().unwrap_or("failed")),
                    escape(why)
                )),
            }
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    xml
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\t' | '\r') => {
                out.push_str(&format!("&#{};", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}
