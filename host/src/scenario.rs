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
//! A reject step may give `reason`, a substring the reason must contain, or `exact_reason`. Any
//! step that is answered by the rule may give `expect_key`, the key the request was applied to
//! (useful for requests routed by user). A transition step may give `absent = ["field", ...]`,
//! data fields that must not be there. Assertions that cannot apply to the expected outcome
//! (`reason` on a transition, `status` on a reject, ...) are refused with the step's file:line.
//!
//! An optional `[coverage]` table declares what the rule knows, and the report lists the (status
//! before, kind) pairs no scenario ran:
//!
//! ```toml
//! [coverage]
//! statuses = ["reserved", "associated"]   # "none" (no state yet) is always included
//! kinds = ["reserve", "associate"]
//! ```
//!
//! Each scenario runs in a fresh in-memory runtime with the production routing, route cache and
//! sandbox limits, so what passes here behaves the same under `turnstile run`. A scenario stops
//! at its first failing step. Coverage counts rule decisions only: an answer replayed from the
//! dedup table and errors the host gives before the rule runs (`id_conflict`, `unknown_route`)
//! are not the rule's.

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
use crate::sandbox::{RuleLimits, RuleLogs, Sandbox};

/// A scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Overrides of the production settings.
    #[serde(default)]
    pub settings: Settings,
    /// What the rule declares it knows, to list the pairs no scenario ran.
    #[serde(default)]
    pub coverage: Option<CoverageDeclaration>,
    /// The scenarios, with their place in the file for messages.
    #[serde(default, rename = "scenario")]
    pub scenarios: Vec<toml::Spanned<Scenario>>,
}

/// `[coverage]` of a scenario file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoverageDeclaration {
    /// Statuses the rule can put a key in (`none`, no state yet, is implied).
    #[serde(default)]
    statuses: Vec<String>,
    /// Request kinds the rule handles.
    #[serde(default)]
    kinds: Vec<String>,
}

/// A parsed scenario file, with the path and text its messages point into.
#[derive(Debug)]
pub struct LoadedFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its contents.
    pub file: ScenarioFile,
    /// Its text, to turn spans into line numbers.
    text: String,
}

impl LoadedFile {
    /// `path:line` of a byte offset in the file.
    fn at(&self, offset: usize) -> String {
        let line = self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1;
        format!("{}:{line}", self.path.display())
    }
}

/// What `turnstile test` may select and show beyond the defaults.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Run only scenarios whose name contains this.
    pub filter: Option<String>,
    /// Show the rule's log lines of every step, not only of failing ones.
    pub nocapture: bool,
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
    /// The steps, with their place in the file for messages.
    #[serde(default, rename = "step")]
    pub steps: Vec<toml::Spanned<Step>>,
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
    exact_reason: Option<String>,
    expect_key: Option<String>,
    absent: Option<Vec<String>>,
    code: Option<String>,
}

impl Step {
    /// The assertions given that cannot apply to the expected outcome.
    fn impossible_assertions(&self) -> Vec<&'static str> {
        let given = [
            ("status", self.status.is_some()),
            ("version", self.version.is_some()),
            ("data", self.data.is_some()),
            ("absent", self.absent.is_some()),
            ("reason", self.reason.is_some()),
            ("exact_reason", self.exact_reason.is_some()),
            ("code", self.code.is_some()),
            ("expect_key", self.expect_key.is_some()),
        ];
        let allowed: &[&str] = match self.expect {
            Expect::Transition => &["status", "version", "data", "absent", "expect_key"],
            Expect::Reject => &["reason", "exact_reason", "expect_key"],
            Expect::Error => &["code"],
        };
        given
            .into_iter()
            .filter(|(name, present)| *present && !allowed.contains(name))
            .map(|(name, _)| name)
            .collect()
    }
}

/// The outcome a step expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Transition,
    Reject,
    Error,
}

impl Expect {
    fn name(self) -> &'static str {
        match self {
            Expect::Transition => "transition",
            Expect::Reject => "reject",
            Expect::Error => "error",
        }
    }
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
    /// `file:line` of its `[[scenario]]`.
    pub at: String,
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
    /// (status before, kind) pairs a `[coverage]` table declares and no scenario ran.
    pub never_ran: Vec<(String, String)>,
    /// Scenarios left out by the filter.
    pub filtered_out: usize,
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

/// Reads and parses a scenario file, and refuses scenarios without steps and assertions that
/// cannot apply to their step's expected outcome, naming each with its file:line.
pub fn load(path: &Path) -> anyhow::Result<LoadedFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: ScenarioFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let loaded = LoadedFile {
        path: path.to_path_buf(),
        file,
        text,
    };
    if loaded.file.scenarios.is_empty() {
        anyhow::bail!("{} has no [[scenario]]", path.display());
    }
    let mut problems = Vec::new();
    for scenario in &loaded.file.scenarios {
        let at = loaded.at(scenario.span().start);
        let scenario = scenario.get_ref();
        if scenario.steps.is_empty() {
            problems.push(format!(
                "{at}: scenario {:?} has no [[scenario.step]]",
                scenario.name
            ));
        }
        for (i, step) in scenario.steps.iter().enumerate() {
            let impossible = step.get_ref().impossible_assertions();
            if !impossible.is_empty() {
                problems.push(format!(
                    "{}: scenario {:?} step {}: {} cannot apply to expect = \"{}\"",
                    loaded.at(step.span().start),
                    scenario.name,
                    i + 1,
                    impossible.join(", "),
                    step.get_ref().expect.name()
                ));
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    Ok(loaded)
}

/// Reads every file first and reports every file's problems together, so one broken file does
/// not hide the others'.
pub fn load_all(files: &[PathBuf]) -> anyhow::Result<Vec<LoadedFile>> {
    let mut loaded = Vec::new();
    let mut problems = Vec::new();
    for path in files {
        match load(path) {
            Ok(file) => loaded.push(file),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{} of {} scenario files cannot be used:\n{}",
            problems.len(),
            files.len(),
            problems.join("\n")
        );
    }
    Ok(loaded)
}

/// Runs every scenario of `files` (those `options.filter` selects) against the rule component
/// `rule_bytes`, printing one line per scenario through `out` as it goes.
pub fn run(
    rule_bytes: &[u8],
    files: &[PathBuf],
    base: &Config,
    options: &RunOptions,
    out: &mut dyn FnMut(&str),
) -> anyhow::Result<Report> {
    let loaded = load_all(files)?;
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = Report::default();
    let mut declared: BTreeSet<(String, String)> = BTreeSet::new();
    for file in &loaded {
        let path = &file.path;
        let config = apply(base, &file.file.settings)?;
        let (sandbox, logs) = Sandbox::new_capturing_logs(RuleLimits::from(&config.rule))?;
        // Refuse a bad component once, with the loader's message, not once per scenario.
        sandbox
            .compile_shared(rule_bytes)
            .context("the rule would be refused")?;
        if let Some(coverage) = &file.file.coverage {
            for from in std::iter::once("none").chain(coverage.statuses.iter().map(String::as_str))
            {
                for kind in &coverage.kinds {
                    declared.insert((from.to_string(), kind.clone()));
                }
            }
        }
        let selected: Vec<&toml::Spanned<Scenario>> = file
            .file
            .scenarios
            .iter()
            .filter(|s| {
                options
                    .filter
                    .as_ref()
                    .is_none_or(|f| s.get_ref().name.contains(f.as_str()))
            })
            .collect();
        report.filtered_out += file.file.scenarios.len() - selected.len();
        if selected.is_empty() {
            continue;
        }
        out(&format!(
            "running {} scenarios from {}",
            selected.len(),
            path.display()
        ));
        for spanned in selected {
            let scenario = spanned.get_ref();
            let started = Instant::now();
            let mut transcript = Vec::new();
            let failure = tokio.block_on(run_scenario(
                &config,
                &sandbox,
                rule_bytes,
                file,
                scenario,
                &mut report.coverage,
                StepLogs {
                    logs: &logs,
                    all: options.nocapture,
                    transcript: &mut transcript,
                },
            ))?;
            out(&format!(
                "scenario {} ... {}",
                scenario.name,
                if failure.is_none() { "ok" } else { "FAILED" }
            ));
            for line in transcript {
                out(&line);
            }
            report.results.push(ScenarioResult {
                file: path.clone(),
                at: file.at(spanned.span().start),
                name: scenario.name.clone(),
                failure,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }
    report.never_ran = declared
        .into_iter()
        .filter(|pair| !report.coverage.contains_key(pair))
        .collect();
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

/// Where a scenario's rule log lines go.
struct StepLogs<'a> {
    /// The sandbox's capture.
    logs: &'a RuleLogs,
    /// Every step's lines into `transcript` (`--nocapture`); else only a failing step's, into
    /// its failure.
    all: bool,
    /// Lines to print after the scenario's result line.
    transcript: &'a mut Vec<String>,
}

/// A step's captured rule log lines, indented for the output.
fn log_lines(logs: &RuleLogs) -> Vec<String> {
    let (lines, dropped) = logs.take();
    let mut out: Vec<String> = lines.into_iter().map(|l| format!("    {l}")).collect();
    if dropped > 0 {
        out.push(format!("    ... {dropped} more lines not shown"));
    }
    out
}

/// Runs one scenario; `Ok(None)` if it passed, `Ok(Some(why))` if a step failed.
async fn run_scenario(
    config: &Config,
    sandbox: &Arc<Sandbox>,
    rule_bytes: &[u8],
    file: &LoadedFile,
    scenario: &Scenario,
    coverage: &mut Coverage,
    step_logs: StepLogs<'_>,
) -> anyhow::Result<Option<String>> {
    let runtime = Runtime::start_in(config, sandbox.clone(), Some(rule_bytes.to_vec()))?;
    // (partition, seq) of every decision so far: seeing one again means the dedup table answered.
    let mut decided: BTreeSet<(u32, u64)> = BTreeSet::new();
    for (i, spanned) in scenario.steps.iter().enumerate() {
        let step = spanned.get_ref();
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
        let mut by_rule = true;
        step_logs.logs.take();
        let submitted = runtime.submit_at(request, at_ms).await;
        let logged = log_lines(step_logs.logs);
        if step_logs.all && !logged.is_empty() {
            step_logs
                .transcript
                .push(format!("  step {number} rule log:"));
            step_logs.transcript.extend(logged.iter().cloned());
        }
        let actual = match submitted {
            Ok(decision) => match decision.verdict {
                _ if !decided.insert((decision.partition, decision.seq)) => {
                    by_rule = false;
                    actual_of(decision)
                }
                _ => actual_of(decision),
            },
            Err(e) => {
                by_rule = matches!(e, crate::runtime::SubmitError::Rule(_));
                Actual::Error {
                    code: e.code().to_string(),
                    message: e.to_string(),
                }
            }
        };
        if by_rule {
            let from = before.map_or_else(|| "none".to_string(), |s| s.status);
            coverage
                .entry((from, step.kind.clone()))
                .or_default()
                .insert(actual.label());
        }
        let mismatches = compare(step, &actual);
        if !mismatches.is_empty() {
            let mut text = format!(
                "step {number} ({}): {} {}by {}\n  actual: {}\n",
                file.at(spanned.span().start),
                step.kind,
                step.key.as_ref().map_or(String::new(), |k| format!("{k} ")),
                step.user,
                actual.describe()
            );
            for line in mismatches {
                text.push_str(&format!("  {line}\n"));
            }
            if !logged.is_empty() {
                text.push_str("  rule log:\n");
                for line in logged {
                    text.push_str(&format!("{line}\n"));
                }
            }
            return Ok(Some(text));
        }
    }
    Ok(None)
}

fn actual_of(decision: crate::model::Decision) -> Actual {
    match decision.verdict {
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
    }
}

/// Lines of `- expected` / `+ actual` for every expectation the step's result misses.
fn compare(step: &Step, actual: &Actual) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |what: &str, expected: String, actual: String| {
        out.push(format!(
            "{what}:\n    - expected {expected}\n    + actual   {actual}"
        ));
    };
    let expected_outcome = step.expect.name();
    let actual_outcome = match actual {
        Actual::Transition { .. } => "transition",
        Actual::Reject { .. } => "reject",
        Actual::Error { .. } => "error",
    };
    if expected_outcome != actual_outcome {
        differ("outcome", expected_outcome.into(), actual_outcome.into());
        return out;
    }
    if let Some(expected) = &step.expect_key
        && let Actual::Transition { key, .. } | Actual::Reject { key, .. } = actual
        && expected != key
    {
        differ("key", format!("{expected:?}"), format!("{key:?}"));
    }
    match actual {
        Actual::Transition {
            status,
            version,
            data,
            ..
        } => {
            for name in step.absent.iter().flatten() {
                if let Some(got) = data.get(name) {
                    differ(&format!("data.{name}"), "absent".into(), got.to_string());
                }
            }
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
            if let Some(expected) = &step.exact_reason
                && expected != reason
            {
                differ("reason", format!("{expected:?}"), format!("{reason:?}"));
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
            xml_escape(&file.display().to_string()),
            results.len()
        ));
        for r in results {
            xml.push_str(&format!(
                "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\"",
                xml_escape(&r.name),
                xml_escape(&file.display().to_string()),
                r.seconds
            ));
            match &r.failure {
                None => xml.push_str("/>\n"),
                Some(why) => xml.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    xml_escape(why.lines().next().unwrap_or("failed")),
                    xml_escape(why)
                )),
            }
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    xml
}

/// Escapes text for XML 1.0 attributes and content; characters XML 1.0 cannot carry at all are
/// shown as `\u{..}`.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 allows no other control character, not even as `&#27;`: show it as `\u{1b}`.
            c if ((c as u32) < 0x20 && !matches!(c, '\n' | '\t' | '\r'))
                || matches!(c, '\u{fffe}' | '\u{ffff}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}
