//! What a rule component costs the host, for BENCHMARKS.md ("Issue 17: rules in other
//! languages"): compile time (with the trial instantiation every load makes), time per call
//! with a fresh instance (the default isolation) and with a warm instance (their difference is
//! the instantiation), fuel per call, and the resident memory that running it adds.
//!
//! `cargo run --release -p turnstile --example rule_costs -- [--config FILE] RULE.wasm...`
//! (`-` stands for the reference rule built into the binary). Each call is the reference
//! scenario's pair: `reserve` on a new key, then `associate` on the state it made. The limits
//! are the configuration's `[rule]` (default: the defaults), as in production.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use turnstile::config::Config;
use turnstile::model::{Outcome, RoutedRequest, State};
use turnstile::sandbox::{Isolation, REFERENCE_RULE, RuleInstance, RuleLimits, Sandbox};

/// Calls measured per mode after the warm-up calls.
const CALLS: usize = 400;
const WARM_UP: usize = 20;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.iter().position(|a| a == "--config") {
        Some(at) => {
            let path = args.get(at + 1).context("--config needs a file")?.clone();
            args.drain(at..at + 2);
            Config::load(std::path::Path::new(&path))?
        }
        None => Config::default(),
    };
    println!(
        "| rule | size | compile + trial instance | call, fresh instance | call, warm instance | instantiation | fuel per call | RSS after compile | RSS per running partition |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for file in args {
        let bytes = if file == "-" {
            REFERENCE_RULE.to_vec()
        } else {
            std::fs::read(&file).with_context(|| format!("reading {file}"))?
        };
        let name = if file == "-" {
            "reference (Rust)"
        } else {
            &file
        };
        let mut per_call = Duration::ZERO;
        let mut warm = Duration::ZERO;
        let (mut compile, mut fuel, mut rss_compiled, mut rss_partition) =
            (Duration::ZERO, 0, 0, 0);
        for isolation in [Isolation::PerCall, Isolation::WarmInstanceLeaksState] {
            let mut limits = RuleLimits::from(&config.rule);
            limits.isolation = isolation;
            let sandbox = Sandbox::new(limits)?;
            let before = rss_bytes();
            let started = Instant::now();
            let rule = Arc::new(
                sandbox
                    .compile(&bytes)
                    .with_context(|| format!("loading {name}"))?,
            );
            let compiled = started.elapsed();
            let after_compile = rss_bytes();
            let mut instance = sandbox.instantiate(rule, 0)?;
            for i in 0..WARM_UP {
                pair(&mut instance, i)?;
            }
            let started = Instant::now();
            for i in 0..CALLS / 2 {
                pair(&mut instance, WARM_UP + i)?;
            }
            let elapsed = started.elapsed() / CALLS as u32;
            if isolation == Isolation::PerCall {
                per_call = elapsed;
                compile = compiled;
                fuel = instance.fuel_used();
                rss_compiled = after_compile.saturating_sub(before);
                rss_partition = rss_bytes().saturating_sub(after_compile);
            } else {
                warm = elapsed;
            }
        }
        println!(
            "| {name} | {:.1} MB | {:.0} ms | {:.0} µs | {:.0} µs | {:.0} µs | {fuel} | {:.1} MB | {:.1} MB |",
            bytes.len() as f64 / 1e6,
            compile.as_secs_f64() * 1e3,
            per_call.as_secs_f64() * 1e6,
            warm.as_secs_f64() * 1e6,
            per_call.saturating_sub(warm).as_secs_f64() * 1e6,
            rss_compiled as f64 / 1e6,
            rss_partition as f64 / 1e6,
        );
    }
    Ok(())
}

/// `reserve` on a new key, then `associate` on what it made; fails on any rule failure.
fn pair(instance: &mut RuleInstance, i: usize) -> anyhow::Result<()> {
    let request = |kind: &str| RoutedRequest {
        id: format!("{kind}-{i}"),
        idempotent: true,
        kind: kind.into(),
        key: format!("R-{i}"),
        user: format!("user-{i}"),
        payload: "null".into(),
        received_at_ms: 1_700_000_000_000 + i as u64,
    };
    let reserved = match instance.handle(None, &request("reserve"))? {
        Outcome::Transition { status, data } => State {
            status,
            user: format!("user-{i}"),
            data,
            version: 1,
            rule_version: instance.rule().version.clone(),
            updated_at_ms: 1_700_000_000_000,
        },
        Outcome::Reject { reason } => anyhow::bail!("reserve was rejected: {reason}"),
    };
    instance.handle(Some(&reserved), &request("associate"))?;
    Ok(())
}

/// The process's resident memory, from `/proc/self/statm`.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
