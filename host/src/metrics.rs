//! Prometheus metrics, kept in atomics so that recording costs the hot path a few relaxed
//! increments, and rendered in the text exposition format on `GET /metrics`.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Upper bounds (µs) of the request latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
];

/// Upper bounds of the batch size histogram buckets.
pub const BATCH_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// At most this many distinct request kinds get their own series; the rest count as `other`,
/// so a client sending random kinds cannot blow up the metrics.
const MAX_KINDS: usize = 64;

/// A fixed-bucket histogram.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One counter per bound, plus +Inf; not cumulative (made cumulative when rendered).
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram over `bounds`.
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn record(&self, value: u64) {
        let index = self.bounds.partition_point(|b| *b < value);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, scale: f64) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                *bound as f64 * scale
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum.load(Ordering::Relaxed) as f64 * scale
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Counters of one request kind.
#[derive(Debug, Default)]
struct KindCounters {
    transition: AtomicU64,
    reject: AtomicU64,
    error: AtomicU64,
}

/// The outcome class of a finished request.
#[derive(Debug, Clone, Copy)]
pub enum OutcomeClass {
    /// A transition.
    Transition,
    /// A reject.
    Reject,
    /// Any error (validation, routing, rule failure, store).
    Error,
}

impl OutcomeClass {
    /// The class of a request's result.
    pub fn of(
        result: &Result<crate::model::Decision, crate::runtime::SubmitError>,
    ) -> OutcomeClass {
        match result {
            Ok(crate::model::Decision {
                verdict: crate::model::Verdict::Transition(_),
                ..
            }) => OutcomeClass::Transition,
            Ok(_) => OutcomeClass::Reject,
            Err(_) => OutcomeClass::Error,
        }
    }
}

/// Process-wide request metrics (per-partition ones live in the partitions' stats).
#[derive(Debug)]
pub struct RequestMetrics {
    kinds: RwLock<HashMap<String, Arc<KindCounters>>>,
    other: Arc<KindCounters>,
    /// Latency from submit to decision, in µs.
    pub latency: Histogram,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            kinds: RwLock::default(),
            other: Arc::default(),
            latency: Histogram::new(&LATENCY_BUCKETS_US),
        }
    }
}

impl RequestMetrics {
    /// Counts one finished request.
    pub fn record(&self, kind: &str, outcome: OutcomeClass, latency_us: u64) {
        self.latency.record(latency_us);
        let counters = self.counters(kind);
        match outcome {
            OutcomeClass::Transition => &counters.transition,
            OutcomeClass::Reject => &counters.reject,
            OutcomeClass::Error => &counters.error,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    fn counters(&self, kind: &str) -> Arc<KindCounters> {
        if let Some(c) = self
            .kinds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kind)
        {
            return c.clone();
        }
        let mut kinds = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        if kinds.len() >= MAX_KINDS && !kinds.contains_key(kind) {
            return self.other.clone();
        }
        kinds.entry(kind.to_string()).or_default().clone()
    }

    /// Renders the request series.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP turnstile_requests_total Requests finished, by kind and outcome.\n");
        out.push_str("# TYPE turnstile_requests_total counter\n");
        let kinds = self.kinds.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = kinds.keys().collect();
        names.sort();
        let series = names
            .into_iter()
            .map(|k| (escape_label(k), &kinds[k]))
            .chain(std::iter::once(("other".to_string(), &self.other)));
        for (kind, c) in series {
            for (outcome, n) in [
                ("transition", &c.transition),
                ("reject", &c.reject),
                ("error", &c.error),
            ] {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "turnstile_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}"
                    );
                }
            }
        }
        out.push_str(
            "# HELP turnstile_request_duration_seconds From submit to durable decision.\n",
        );
        out.push_str("# TYPE turnstile_request_duration_seconds histogram\n");
        self.latency
            .render(out, "turnstile_request_duration_seconds", "", 1e-6);
    }
}

/// What the metrics show of one partition.
pub struct PartitionSample<'a> {
    /// Partition index.
    pub id: u32,
    /// Requests waiting for it: its queue, or in Kafka mode its lag in the requests topic.
    pub queue_depth: u64,
    /// The counters its thread publishes.
    pub stats: &'a crate::partition::PartitionStats,
    /// The rule version it runs.
    pub rule_version: &'a str,
}

/// The per-partition series, shared by `turnstile run` and Kafka mode.
pub fn render_partitions(out: &mut String, partitions: &[PartitionSample<'_>]) {
    /// Name, type, help, and how to read one partition's value.
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&PartitionSample<'_>) -> u64,
    );
    let series: [Series; 13] = [
        (
            "turnstile_partition_queue_depth",
            "gauge",
            "Requests waiting for the partition (its queue; in Kafka mode its lag).",
            |p| p.queue_depth,
        ),
        (
            "turnstile_partition_applied_total",
            "counter",
            "Requests applied (transitions and rejects).",
            |p| p.stats.applied.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_deduplicated_total",
            "counter",
            "Retries answered from the dedup table.",
            |p| p.stats.deduplicated.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_batches_total",
            "counter",
            "Group commits.",
            |p| p.stats.batches.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_store_failures_total",
            "counter",
            "Requests failed because their batch could not be stored.",
            |p| p.stats.store_failures.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_fuel_used_total",
            "counter",
            "Fuel the rule used.",
            |p| p.stats.fuel_used.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_refused_total",
            "counter",
            "Requests refused before the rule saw them (malformed, or a record on the wrong partition) and dead-lettered.",
            |p| p.stats.refused.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_quarantined_records",
            "gauge",
            "Damaged records quarantined in the partition's file (requests that need one answer record_damaged).",
            |p| p.stats.quarantined.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_data_bytes",
            "gauge",
            "Size of the partition's file in bytes, sampled about once a second (0 in memory).",
            |p| p.stats.data_bytes.load(Ordering::Relaxed),
        ),
        (
            "turnstile_partition_routes_expired_total",
            "counter",
            "Stored routes removed in the background because they outlived routes.ttl_seconds.",
            |p| p.stats.routes_expired.load(Ordering::Relaxed),
        ),
        (
            "turnstile_breaker_open_keys",
            "gauge",
            "Keys quarantined now: their rule failures went over the budget (rule.breaker_*).",
            |p| p.stats.breaker.open_keys.load(Ordering::Relaxed),
        ),
        (
            "turnstile_breaker_opened_total",
            "counter",
            "Times a key was quarantined (over the failure budget, or a failed half-open probe).",
            |p| p.stats.breaker.opened.load(Ordering::Relaxed),
        ),
        (
            "turnstile_breaker_refused_total",
            "counter",
            "Requests refused with rule_quarantined, before the rule ran.",
            |p| p.stats.breaker.refused.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in partitions {
            let _ = writeln!(out, "{name}{{partition=\"{}\"}} {}", p.id, value(p));
        }
    }
    out.push_str("# HELP turnstile_rule_failures_total Rule failures by kind.\n# TYPE turnstile_rule_failures_total counter\n");
    for p in partitions {
        for (kind, n) in crate::sandbox::FailureKind::ALL
            .iter()
            .zip(&p.stats.rule_failures)
        {
            let _ = writeln!(
                out,
                "turnstile_rule_failures_total{{partition=\"{}\",code=\"{}\"}} {}",
                p.id,
                kind.code(),
                n.load(Ordering::Relaxed)
            );
        }
    }
    out.push_str("# HELP turnstile_batch_size Requests per group commit.\n# TYPE turnstile_batch_size histogram\n");
    for p in partitions {
        p.stats.batch_sizes.render(
            out,
            "turnstile_batch_size",
            &format!("partition=\"{}\"", p.id),
            1.0,
        );
    }
    out.push_str("# HELP turnstile_rule_version_info The rule version each partition runs.\n# TYPE turnstile_rule_version_info gauge\n");
    for p in partitions {
        let _ = writeln!(
            out,
            "turnstile_rule_version_info{{partition=\"{}\",version=\"{}\"}} 1",
            p.id,
            escape_label(p.rule_version)
        );
    }
    // Process-wide: what the sandbox and the log sink dropped instead of blocking or flooding.
    let _ = writeln!(
        out,
        "# HELP turnstile_rule_log_lines_dropped_total Rule log lines dropped by the per-partition rate limit.\n# TYPE turnstile_rule_log_lines_dropped_total counter\nturnstile_rule_log_lines_dropped_total {}\n# HELP turnstile_log_lines_dropped_total Log lines dropped because stderr did not keep up.\n# TYPE turnstile_log_lines_dropped_total counter\nturnstile_log_lines_dropped_total {}",
        crate::sandbox::RULE_LOG_LINES_DROPPED.load(Ordering::Relaxed),
        crate::logging::LOG_LINES_DROPPED.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP turnstile_rule_compiled_versions Rule versions kept compiled in memory (running, and up to rule.max_idle_compiled_versions others).\n# TYPE turnstile_rule_compiled_versions gauge\nturnstile_rule_compiled_versions {}",
        crate::reload::COMPILED_VERSIONS.load(Ordering::Relaxed),
    );
}

/// The route cache's size.
pub fn render_route_cache(out: &mut String, entries: usize) {
    let _ = writeln!(
        out,
        "# HELP turnstile_route_cache_entries Routes held in memory.\n# TYPE turnstile_route_cache_entries gauge\nturnstile_route_cache_entries {entries}"
    );
}

/// Escapes a label value.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&BATCH_BUCKETS);
        for v in [1, 3, 3, 2000] {
            h.record(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "", 1.0);
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1024\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count{} 4\n"), "{out}");
    }

    #[test]
    fn kinds_are_bounded() {
        let m = RequestMetrics::default();
        for i in 0..200 {
            m.record(&format!("kind-{i}"), OutcomeClass::Reject, 10);
        }
        let mut out = String::new();
        m.render(&mut out);
        assert_eq!(out.matches("outcome=\"reject\"").count(), MAX_KINDS + 1);
        assert!(
            out.contains("kind=\"other\",outcome=\"reject\"} 136"),
            "{out}"
        );
    }
}
