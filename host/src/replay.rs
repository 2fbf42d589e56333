//! `turnstile replay`: shadow evaluation of a candidate rule against a data dir's history.
//!
//! Every applied request in every partition's log is decided again by the candidate, against the
//! state the log implies just before that request (the state the running rule saw), and the
//! candidate's decision is compared with the logged one. The report counts the decisions that
//! would differ, grouped by (kind, logged outcome → candidate outcome), with the first examples in
//! full. This is how a team sees what a new policy would change before installing it.
//!
//! The data dir is only read: partition files are opened with redb's read-only open, nothing is
//! created or written, and it works on a stopped server's data dir or on a copy.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use redb::{ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::Serialize;

use crate::config::Config;
use crate::model::{Outcome, RoutedRequest, State};
use crate::sandbox::{Isolation, RuleFailure, RuleLimits, Sandbox};
use crate::store::{self, LOG, LogEntry};

/// What a replay found.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Version id of the candidate.
    pub candidate_version: String,
    /// Partitions read.
    pub partitions: u32,
    /// Logged decisions replayed.
    pub decisions: u64,
    /// Decisions the candidate makes the same way.
    pub same: u64,
    /// Decisions the candidate makes differently (its failures included).
    pub different: u64,
    /// Requests on which the candidate failed (trap, fuel, deadline, memory, output).
    pub errors: u64,
    /// The same counts by the rule version that made the logged decision, oldest first seen.
    pub by_rule_version: Vec<VersionCounts>,
    /// Differences by kind and outcome change.
    pub groups: Vec<Group>,
    /// The first differences, in full.
    pub examples: Vec<Example>,
    /// What makes the comparison less trustworthy (e.g. a log decided by warm instances).
    pub warnings: Vec<String>,
    /// Logged decisions not replayed because their key's history begins before the oldest
    /// log entry kept (`store.log_retention`): the state before them is unknown.
    pub skipped: u64,
}

/// How the candidate compares with the decisions one logged rule version made.
#[derive(Debug, Clone, Serialize)]
pub struct VersionCounts {
    /// Version id of the rule that made the logged decisions.
    pub rule_version: String,
    /// Logged decisions it made.
    pub decisions: u64,
    /// Of those, decided the same way by the candidate.
    pub same: u64,
    /// Of those, decided differently (failures included).
    pub different: u64,
    /// Of those, failures of the candidate.
    pub errors: u64,
}

/// A count of differences of one kind and one outcome change.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// The request kind.
    pub kind: String,
    /// The logged outcome (`transition:<status>`, `reject`).
    pub logged: String,
    /// The candidate's outcome (`transition:<status>`, `reject`, `error:<code>`).
    pub candidate: String,
    /// How many decisions.
    pub count: u64,
}

/// One difference in full.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// The partition.
    pub partition: u32,
    /// Position in the partition's log.
    pub seq: u64,
    /// The request.
    pub request: RoutedRequest,
    /// The state the request met.
    pub state: Option<State>,
    /// What was decided.
    pub logged: Outcome,
    /// What the candidate decides.
    pub candidate: Result<Outcome, RuleFailure>,
}

/// Replays `dir`'s logs through `candidate`. `progress(done, total)` is called as it goes.
pub fn replay(
    dir: &Path,
    candidate: &[u8],
    config: &Config,
    max_examples: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<ReplayReport> {
    let layout = store::read_layout(dir)?.with_context(|| {
        format!(
            "{} is not a turnstile data dir (no turnstile.json)",
            dir.display()
        )
    })?;
    // The candidate always runs isolated: its decisions must depend on the log only.
    let mut limits = RuleLimits::from(&config.rule);
    limits.isolation = Isolation::PerCall;
    let sandbox = Sandbox::new(limits)?;
    let rule = Arc::new(
        sandbox
            .compile(candidate)
            .context("the candidate would be refused")?,
    );
    let generation = store::generation_dir(dir, layout.generation);

    let mut databases = Vec::new();
    let mut total = 0;
    for p in 0..layout.partitions {
        let path = store::partition_path(&generation, p);
        let db = ReadOnlyDatabase::open(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "{} is in use: a turnstile server is running on this data dir; replay a backup of it \
                 (`turnstile backup --url URL --out DIR`), or stop the server first",
                path.display()
            ),
            redb::DatabaseError::RepairAborted => anyhow::anyhow!(
                "{} needs recovery before it can be read: it was left by a crash, or copied while a \
                 server was writing it (a plain copy of a running server's files is not consistent; \
                 take one with `turnstile backup`); start the server on this data dir once to recover it",
                path.display()
            ),
            e => anyhow::anyhow!("opening {} read-only: {e}", path.display()),
        })?;
        total += db.begin_read()?.open_table(LOG)?.len()?;
        databases.push(db);
    }

    let mut report = ReplayReport {
        candidate_version: rule.version.clone(),
        partitions: layout.partitions,
        decisions: 0,
        same: 0,
        different: 0,
        errors: 0,
        by_rule_version: Vec::new(),
        groups: Vec::new(),
        examples: Vec::new(),
        warnings: Vec::new(),
        skipped: 0,
    };
    if let Some(since_ms) = crate::reload::warm_instances_since(dir) {
        report.warnings.push(format!(
            "since {since_ms} (ms since the Unix epoch) this data dir ran rules with rule.isolation = \"warm_instance_leaks_state\": a logged decision may depend on earlier requests, so differences may come from the log, not the candidate"
        ));
    }
    let mut groups: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut by_version: Vec<VersionCounts> = Vec::new();
    for (p, db) in databases.iter().enumerate() {
        let mut instance = sandbox.instantiate(rule.clone(), p as u32)?;
        let mut states: HashMap<String, State> = HashMap::new();
        // Keys whose history began before the oldest kept entry (the log was trimmed).
        let mut unknown: std::collections::HashSet<String> = std::collections::HashSet::new();
        let txn = db.begin_read()?;
        for row in txn.open_table(LOG)?.iter()? {
            let (seq, value) = row?;
            let entry: LogEntry = store::decode(&seq.value(), value.value()).map_err(|e| {
                anyhow::anyhow!(
                    "{}: table `log`, key `{}`: {e}; {}",
                    store::partition_path(&generation, p as u32).display(),
                    seq.value(),
                    store::DAMAGE_RECOVERY
                )
            })?;
            let version_before = match entry.outcome {
                Outcome::Transition { .. } => entry.state_version.saturating_sub(1),
                Outcome::Reject { .. } => entry.state_version,
            };
            if unknown.contains(&entry.request.key)
                || (version_before > 0 && !states.contains_key(&entry.request.key))
            {
                unknown.insert(entry.request.key.clone());
                report.skipped += 1;
                continue;
            }
            let current = states.get(&entry.request.key).cloned();
            let decided = instance.handle(current.as_ref(), &entry.request);
            report.decisions += 1;
            let position = match by_version
                .iter()
                .position(|v| v.rule_version == entry.rule_version)
            {
                Some(i) => i,
                None => {
                    by_version.push(VersionCounts {
                        rule_version: entry.rule_version.clone(),
                        decisions: 0,
                        same: 0,
                        different: 0,
                        errors: 0,
                    });
                    by_version.len() - 1
                }
            };
            let counts = &mut by_version[position];
            counts.decisions += 1;
            if decided.is_err() {
                report.errors += 1;
                counts.errors += 1;
            }
            if decided
                .as_ref()
                .is_ok_and(|o| same_outcome(o, &entry.outcome))
            {
                report.same += 1;
                counts.same += 1;
            } else {
                report.different += 1;
                counts.different += 1;
                let candidate_label = match &decided {
                    Ok(o) => label(o),
                    Err(f) => format!("error:{}", f.kind.code()),
                };
                *groups
                    .entry((
                        entry.request.kind.clone(),
                        label(&entry.outcome),
                        candidate_label,
                    ))
                    .or_default() += 1;
                if report.examples.len() < max_examples {
                    report.examples.push(Example {
                        partition: p as u32,
                        seq: entry.seq,
                        request: entry.request.clone(),
                        state: current.clone(),
                        logged: entry.outcome.clone(),
                        candidate: decided,
                    });
                }
            }
            // Move on along the logged history, not the candidate's.
            if let Outcome::Transition { status, data } = &entry.outcome {
                let user = current.map_or_else(|| entry.request.user.clone(), |s| s.user);
                states.insert(
                    entry.request.key.clone(),
                    State {
                        status: status.clone(),
                        user,
                        data: data.clone(),
                        version: entry.state_version,
                        rule_version: entry.rule_version.clone(),
                        updated_at_ms: entry.request.received_at_ms,
                    },
                );
            }
            if report.decisions.is_multiple_of(1000) {
                progress(report.decisions, total);
            }
        }
    }
    progress(report.decisions, total);
    if report.skipped > 0 {
        report.warnings.push(format!(
            "{} logged decisions were not replayed: their key's history begins before the oldest log entry kept (store.log_retention, store.log_retention_seconds), so the state they were decided on is unknown",
            report.skipped
        ));
    }
    report.by_rule_version = by_version;
    report.groups = groups
        .into_iter()
        .map(|((kind, logged, candidate), count)| Group {
            kind,
            logged,
            candidate,
            count,
        })
        .collect();
    Ok(report)
}

/// Same decision: same outcome, same status, and data equal as JSON (key order and spacing do
/// not count as a difference).
fn same_outcome(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (
            Outcome::Transition {
                status: s1,
                data: d1,
            },
            Outcome::Transition {
                status: s2,
                data: d2,
            },
        ) => {
            s1 == s2
                && (d1 == d2
                    || serde_json::from_str::<serde_json::Value>(d1).ok()
                        == serde_json::from_str::<serde_json::Value>(d2).ok())
        }
        (Outcome::Reject { reason: r1 }, Outcome::Reject { reason: r2 }) => r1 == r2,
        _ => false,
    }
}

fn label(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Transition { status, .. } => format!("transition:{status}"),
        Outcome::Reject { .. } => "reject".into(),
    }
}

/// The report as text for people.
pub fn render(report: &ReplayReport, dir: &Path) -> String {
    let mut out = format!(
        "replayed {} decisions from {} partitions of {} through candidate {}\n  same:      {}\n  different: {}\n",
        report.decisions,
        report.partitions,
        dir.display(),
        crate::sandbox::short_version(&report.candidate_version),
        report.same,
        report.different
    );
    for warning in &report.warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out.push_str(&format!("  errors:    {}\n", report.errors));
    if report.by_rule_version.len() > 1 || report.different > 0 {
        out.push_str("\nby logged rule version (decisions, same, different, errors):\n");
        for v in &report.by_rule_version {
            out.push_str(&format!(
                "  {}  {} {} {} {}\n",
                crate::sandbox::short_version(&v.rule_version),
                v.decisions,
                v.same,
                v.different,
                v.errors
            ));
        }
    }
    if !report.groups.is_empty() {
        out.push_str("\ndifferences by kind, logged → candidate:\n");
        for g in &report.groups {
            out.push_str(&format!(
                "  {:<12} {} → {}: {}\n",
                g.kind, g.logged, g.candidate, g.count
            ));
        }
    }
    if !report.examples.is_empty() {
        out.push_str(&format!("\nfirst {} differences:\n", report.examples.len()));
        for e in &report.examples {
            out.push_str(&format!(
                "  partition {} seq {}: {} {} by {} (id {})\n    state:     {}\n    logged:    {}\n    candidate: {}\n",
                e.partition,
                e.seq,
                e.request.kind,
                e.request.key,
                e.request.user,
                e.request.id,
                e.state.as_ref().map_or("none".to_string(), |s| format!("{} (version {}) {}", s.status, s.version, s.data)),
                describe(&e.logged),
                match &e.candidate {
                    Ok(o) => describe(o),
                    Err(f) => format!("error {}: {}", f.kind.code(), f.message),
                }
            ));
        }
    }
    out
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Transition { status, data } => format!("transition to {status:?} with {data}"),
        Outcome::Reject { reason } => format!("reject: {reason:?}"),
    }
}

/// The report as JUnit XML for CI: one test case per logged rule version, failed when the
/// candidate decides any of that version's decisions differently.
pub fn junit(report: &ReplayReport) -> String {
    let failed = report
        .by_rule_version
        .iter()
        .filter(|v| v.different > 0)
        .count();
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    xml.push_str(&format!(
        "<testsuites name=\"turnstile replay\" tests=\"{}\" failures=\"{failed}\">\n  <testsuite name=\"candidate {}\" tests=\"{}\" failures=\"{failed}\">\n",
        report.by_rule_version.len(),
        crate::sandbox::short_version(&report.candidate_version),
        report.by_rule_version.len(),
    ));
    for v in &report.by_rule_version {
        xml.push_str(&format!(
            "    <testcase name=\"decisions logged by {}\" classname=\"replay\"",
            v.rule_version
        ));
        if v.different == 0 {
            xml.push_str("/>\n");
        } else {
            let mut text = String::new();
            for g in &report.groups {
                text.push_str(&format!(
                    "{} {} -> {}: {}\n",
                    g.kind, g.logged, g.candidate, g.count
                ));
            }
            xml.push_str(&format!(
                ">\n      <failure message=\"{} of {} decisions differ ({} errors)\">{}</failure>\n    </testcase>\n",
                v.different,
                v.decisions,
                v.errors,
                crate::scenario::xml_escape(&text)
            ));
        }
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
}
