//! The failure budget of a partition: a circuit breaker per key.
//!
//! A rule that fails costs its partition a whole call (up to the deadline) each time, so a
//! client repeating a request that always fails can starve every other key of the partition.
//! When one key's requests fail `rule.breaker_failures` times within `rule.breaker_window_ms`,
//! the breaker opens for that key: its requests are refused at once with `rule_quarantined`
//! (before the rule runs, without a dead letter) for `rule.breaker_cooldown_ms`. After the
//! cool-down the next request of the key is let through (half-open): if the rule decides it,
//! the key is healthy again; if it fails, the breaker opens again at once. Installing a rule
//! closes every breaker, since the new rule may not fail.
//!
//! The breaker lives in the partition engine and is owned by its thread, so it needs no lock and
//! serves local and Kafka mode alike; it publishes its counters through [`BreakerStats`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most keys a partition's breaker tracks at once. A key seen failing when the table is full
/// (after dropping keys whose window passed) is not tracked, so the table cannot grow with an
/// attacker's number of keys; each untracked failure still costs only its own call.
pub const MAX_TRACKED_KEYS: usize = 10_000;

/// When a key's breaker opens and for how long (`[rule] breaker_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures of one key within the window that open its breaker; 0 turns breakers off.
    pub failures: u32,
    /// The window failures are counted in, in milliseconds.
    pub window_ms: u64,
    /// How long an open breaker refuses the key before letting one request through.
    pub cooldown_ms: u64,
}

/// Counters a partition's breaker publishes; written only by the partition's thread.
#[derive(Debug, Default)]
pub struct BreakerStats {
    /// Keys whose breaker is open now (refusing), as of the partition's last look.
    pub open_keys: AtomicU64,
    /// Times a breaker opened (a key crossed the budget, or a half-open probe failed).
    pub opened: AtomicU64,
    /// Requests refused with `rule_quarantined`.
    pub refused: AtomicU64,
}

/// What `GET /v1/partitions` shows of a partition's breakers.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BreakerView {
    /// Keys refused now.
    pub open_keys: u64,
    /// Times a breaker opened.
    pub opened: u64,
    /// Requests refused with `rule_quarantined`.
    pub refused: u64,
}

impl BreakerStats {
    /// A snapshot for the API.
    pub fn view(&self) -> BreakerView {
        BreakerView {
            open_keys: self.open_keys.load(Ordering::Relaxed),
            opened: self.opened.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// A request refused because its key's breaker is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// How long until the breaker lets a request of the key through again.
    pub retry_after_ms: u64,
}

/// One key's recent failures.
#[derive(Debug)]
struct KeyHealth {
    /// When the current counting window started (ms since the epoch).
    window_start_ms: u64,
    /// Failures since `window_start_ms`.
    failures: u32,
    /// Set while the breaker is open or half-open: until when requests are refused.
    open_until_ms: Option<u64>,
}

/// The breakers of one partition's keys.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    keys: HashMap<String, KeyHealth>,
    /// The earliest time an open breaker turns half-open: `open_keys` is recounted then, so the
    /// published gauge does not keep counting keys whose cool-down has passed.
    next_expiry_ms: u64,
}

impl Breaker {
    /// Breakers with these settings, all closed.
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            settings,
            keys: HashMap::new(),
            next_expiry_ms: u64::MAX,
        }
    }

    fn enabled(&self) -> bool {
        self.settings.failures > 0
    }

    /// Whether a request for `key` may reach the rule now; counts a refusal.
    pub fn admit(&self, key: &str, now_ms: u64, stats: &BreakerStats) -> Result<(), Quarantined> {
        if self.keys.is_empty() {
            return Ok(());
        }
        match self.keys.get(key).and_then(|h| h.open_until_ms) {
            Some(until) if now_ms < until => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(Quarantined {
                    retry_after_ms: until - now_ms,
                })
            }
            _ => Ok(()),
        }
    }

    /// Records what the rule did with an admitted request for `key`.
    pub fn record(&mut self, key: &str, failed: bool, now_ms: u64, stats: &BreakerStats) {
        if !self.enabled() {
            return;
        }
        if !failed {
            // Only a half-open key's success changes anything: it closes the breaker. Failures
            // of a closed key keep counting in their window; successes do not erase them.
            if self
                .keys
                .get(key)
                .is_some_and(|h| h.open_until_ms.is_some())
            {
                self.keys.remove(key);
                self.publish(now_ms, stats);
            }
            return;
        }
        if !self.keys.contains_key(key) && self.keys.len() >= MAX_TRACKED_KEYS {
            self.forget_idle(now_ms);
            if self.keys.len() >= MAX_TRACKED_KEYS {
                return;
            }
        }
        let settings = self.settings;
        let health = self.keys.entry(key.to_string()).or_insert(KeyHealth {
            window_start_ms: now_ms,
            failures: 0,
            open_until_ms: None,
        });
        if health.open_until_ms.is_some() {
            // An admitted request of an open key is the half-open probe: it failed, so the
            // breaker opens again for a whole cool-down.
            health.open_until_ms = Some(now_ms.saturating_add(settings.cooldown_ms));
        } else {
            if now_ms.saturating_sub(health.window_start_ms) >= settings.window_ms {
                health.window_start_ms = now_ms;
                health.failures = 0;
            }
            health.failures += 1;
            if health.failures < settings.failures {
                return;
            }
            health.open_until_ms = Some(now_ms.saturating_add(settings.cooldown_ms));
        }
        stats.opened.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            key = %crate::sandbox::escape_untrusted(key, 128),
            cooldown_ms = settings.cooldown_ms,
            "rule failures over budget: key quarantined"
        );
        self.publish(now_ms, stats);
    }

    /// Closes every breaker (a new rule was installed).
    pub fn reset(&mut self, stats: &BreakerStats) {
        self.keys.clear();
        self.next_expiry_ms = u64::MAX;
        stats.open_keys.store(0, Ordering::Relaxed);
    }

    /// Recounts the open keys when a cool-down has passed since the last count. Cheap otherwise;
    /// the engine calls it once per batch.
    pub fn tick(&mut self, now_ms: u64, stats: &BreakerStats) {
        if now_ms >= self.next_expiry_ms {
            self.publish(now_ms, stats);
        }
    }

    /// Publishes how many keys are refused now, and when that count changes next.
    fn publish(&mut self, now_ms: u64, stats: &BreakerStats) {
        let open = self
            .keys
            .values()
            .filter_map(|h| h.open_until_ms)
            .filter(|until| *until > now_ms);
        let (count, next) = open.fold((0u64, u64::MAX), |(n, next), until| {
            (n + 1, next.min(until))
        });
        self.next_expiry_ms = next;
        stats.open_keys.store(count, Ordering::Relaxed);
    }

    /// Drops keys that are neither refused nor failing within their window.
    fn forget_idle(&mut self, now_ms: u64) {
        let window_ms = self.settings.window_ms;
        self.keys.retain(|_, h| match h.open_until_ms {
            Some(until) => until > now_ms,
            None => now_ms.saturating_sub(h.window_start_ms) < window_ms,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (Breaker, BreakerStats) {
        let settings = BreakerSettings {
            failures: 3,
            window_ms: 1_000,
            cooldown_ms: 5_000,
        };
        (Breaker::new(settings), BreakerStats::default())
    }

    #[test]
    fn opens_after_the_budget_and_half_opens_after_the_cooldown() {
        let (mut b, stats) = breaker();
        for t in 0..3 {
            assert!(b.admit("k", t, &stats).is_ok());
            b.record("k", true, t, &stats);
        }
        assert_eq!(
            b.admit("k", 10, &stats),
            Err(Quarantined {
                retry_after_ms: 4_992
            })
        );
        assert!(b.admit("other", 10, &stats).is_ok());
        assert_eq!(stats.view().open_keys, 1);
        // Half-open: one request passes; its failure opens the breaker again.
        assert!(b.admit("k", 5_002, &stats).is_ok());
        b.record("k", true, 5_002, &stats);
        assert!(b.admit("k", 5_003, &stats).is_err());
        assert_eq!(stats.view().opened, 2);
        // A success after the next cool-down closes it for good.
        assert!(b.admit("k", 10_003, &stats).is_ok());
        b.record("k", false, 10_003, &stats);
        assert!(b.admit("k", 10_004, &stats).is_ok());
        assert_eq!(stats.view().open_keys, 0);
        assert_eq!(stats.view().refused, 2);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let (mut b, stats) = breaker();
        for t in [0, 600, 1_200, 1_800] {
            b.record("k", true, t, &stats);
        }
        // 0 and 600 in one window; 1 200 and 1 800 in the next: never three in one.
        assert!(b.admit("k", 1_900, &stats).is_ok());
    }

    #[test]
    fn a_rule_install_closes_every_breaker() {
        let (mut b, stats) = breaker();
        for t in 0..3 {
            b.record("k", true, t, &stats);
        }
        b.reset(&stats);
        assert!(b.admit("k", 10, &stats).is_ok());
        assert_eq!(stats.view().open_keys, 0);
    }

    #[test]
    fn zero_failures_turns_breakers_off() {
        let (_, stats) = breaker();
        let mut b = Breaker::new(BreakerSettings {
            failures: 0,
            window_ms: 1_000,
            cooldown_ms: 5_000,
        });
        for t in 0..100 {
            b.record("k", true, t, &stats);
        }
        assert!(b.admit("k", 100, &stats).is_ok());
    }

    #[test]
    fn the_gauge_forgets_keys_whose_cooldown_passed() {
        let (mut b, stats) = breaker();
        for t in 0..3 {
            b.record("k", true, t, &stats);
        }
        assert_eq!(stats.view().open_keys, 1);
        b.tick(4_000, &stats);
        assert_eq!(stats.view().open_keys, 1);
        b.tick(5_002, &stats);
        assert_eq!(stats.view().open_keys, 0);
    }
}
