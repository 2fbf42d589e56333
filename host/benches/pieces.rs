//! Micro-benchmarks of the pieces on the hot path: `cargo bench -p turnstile`.
//!
//! - the partitioner (Java `String.hashCode` and Kafka murmur2) on a typical key;
//! - one call of the reference rule as a Wasm component (in a fresh instance, the default, and in
//!   a warm instance kept between calls), and the same rule compiled natively;
//! - trap recovery: a call that really traps (the rule runs out of fuel) in warm mode, which
//!   drops the instance, so each iteration also pays the new Store + instance the trap leaves;
//! - one group commit of 256 requests into a partition store with every record a partition
//!   writes for an idempotent transition: route, state read and write, log entry, dedup entry;
//!   and one of 128 reserve + associate pairs whose two requests share the batch (the key's
//!   state read back from the batch and stored once).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use turnstile::config::{Config, Durability};
use turnstile::model::{Decision, Outcome, RoutedRequest, State, Verdict};
use turnstile::router::{HashKind, Partitioner, Route};
use turnstile::sandbox::{Isolation, REFERENCE_RULE, RuleLimits, Sandbox};
use turnstile::store::{DedupEntry, Location, LogEntry, PartitionStore};

fn request(kind: &str) -> RoutedRequest {
    RoutedRequest {
        id: "bench-1".into(),
        idempotent: false,
        kind: kind.into(),
        key: "R-2022-08-30-000042".into(),
        user: "user-000042".into(),
        payload: "null".into(),
        received_at_ms: 1_700_000_000_000,
    }
}

fn partitioner(c: &mut Criterion) {
    let key = "R-2022-08-30-000042";
    for hash in [HashKind::Java, HashKind::Murmur2] {
        let p = Partitioner::new(hash, 12);
        c.bench_function(&format!("partition/{}", hash.name()), |b| {
            b.iter(|| p.partition(black_box(key)))
        });
    }
}

fn rule_call(c: &mut Criterion) {
    let sandbox = Sandbox::new(RuleLimits::from(&Config::default().rule)).unwrap();
    let rule = Arc::new(sandbox.compile(REFERENCE_RULE).unwrap());
    let mut instance = sandbox.instantiate(rule, 0).unwrap();
    let mut warm_limits = RuleLimits::from(&Config::default().rule);
    warm_limits.isolation = Isolation::WarmInstanceLeaksState;
    let warm_sandbox = Sandbox::new(warm_limits).unwrap();
    let warm_rule = Arc::new(warm_sandbox.compile(REFERENCE_RULE).unwrap());
    let mut warm = warm_sandbox.instantiate(warm_rule, 0).unwrap();
    let reserved = State {
        status: "reserved".into(),
        user: "user-000042".into(),
        data: "{\"reserved_at_ms\":1700000000000}".into(),
        version: 1,
        rule_version: String::new(),
        updated_at_ms: 0,
    };
    let associate = request("associate");
    c.bench_function(
        "rule/wasm associate (fresh instance per call, the default)",
        |b| b.iter(|| instance.handle(black_box(Some(&reserved)), black_box(&associate))),
    );
    c.bench_function("rule/wasm associate (warm instance, leaks state)", |b| {
        b.iter(|| warm.handle(black_box(Some(&reserved)), black_box(&associate)))
    });
    let native = turnstile::native::REFERENCE;
    c.bench_function("rule/native associate", |b| {
        b.iter(|| (native.decide)(black_box(Some(&reserved)), black_box(&associate)))
    });
    c.bench_function(
        "rule/wasm new store and instance (warm mode, after a failure)",
        |b| b.iter(|| warm.replace_rule(warm.rule().clone()).unwrap()),
    );
    // Too little fuel for the call: the rule traps every time, and the warm instance is dropped
    // as after any failure, so the next iteration instantiates afresh.
    let mut trapping_limits = RuleLimits::from(&Config::default().rule);
    trapping_limits.isolation = Isolation::WarmInstanceLeaksState;
    trapping_limits.fuel = 50;
    let trapping_sandbox = Sandbox::new(trapping_limits).unwrap();
    let trapping_rule = Arc::new(trapping_sandbox.compile(REFERENCE_RULE).unwrap());
    let mut trapping = trapping_sandbox.instantiate(trapping_rule, 0).unwrap();
    assert!(
        trapping.handle(Some(&reserved), &associate).is_err(),
        "the trap recovery bench needs a call that traps"
    );
    c.bench_function(
        "rule/wasm trap recovery (a call that runs out of fuel, then a new instance)",
        |b| b.iter(|| trapping.handle(black_box(Some(&reserved)), black_box(&associate))),
    );
}

/// A rule version id as partitions record it: the sha256 of the component, in hex.
const RULE_VERSION: &str = "823944624dc8fd1ae2355ab78b9f8a0e6a85f44c0004c34e3c1956a187441251";

fn group_commit(c: &mut Criterion) {
    let mut store = PartitionStore::open(&Location::Memory, 0, Durability::None, 1_000).unwrap();
    let mut round = 0u64;
    c.bench_function(
        "store/group commit of 256 idempotent transitions (route, state, log, dedup)",
        |b| {
            b.iter(|| {
                round += 1;
                store
                    .write_batch(|tx| {
                        for i in 0..256u64 {
                            let n = round * 256 + i;
                            let key = format!("k-{}", n % 100_000);
                            let mut request = request("reserve");
                            request.id = format!("id-{n}");
                            request.idempotent = true;
                            request.key = key.clone();
                            request.user = format!("u-{}", n % 100_000);
                            // The same records, in the same order, as a partition applying it.
                            tx.record_route(
                                &request.user,
                                &Route {
                                    key: key.clone(),
                                    recorded_at_ms: request.received_at_ms,
                                },
                            )?;
                            let current = tx.state(&key)?;
                            let state = State {
                                status: "reserved".into(),
                                user: request.user.clone(),
                                data: "{}".into(),
                                version: current.map_or(0, |s| s.version) + 1,
                                rule_version: RULE_VERSION.into(),
                                updated_at_ms: 0,
                            };
                            tx.put_state(&key, &state)?;
                            let seq = tx.append_log(LogEntry {
                                seq: 0,
                                request: request.clone(),
                                outcome: Outcome::Transition {
                                    status: "reserved".into(),
                                    data: "{}".into(),
                                },
                                state_version: state.version,
                                rule_version: RULE_VERSION.into(),
                                applied_at_ms: 0,
                            })?;
                            tx.put_dedup(
                                &request.id,
                                &DedupEntry {
                                    fingerprint: "0".repeat(64),
                                    decision: Decision {
                                        id: request.id.clone(),
                                        key,
                                        partition: 0,
                                        seq,
                                        verdict: Verdict::Transition(state),
                                        rule_version: RULE_VERSION.into(),
                                    },
                                },
                            )?;
                        }
                        Ok(())
                    })
                    .unwrap()
            })
        },
    );
}

/// The records of one applied request without a client id: state read and write, log entry.
fn apply(
    tx: &mut turnstile::store::Batch<'_>,
    request: &RoutedRequest,
    status: &str,
) -> Result<(), turnstile::store::StoreError> {
    let current = tx.state(&request.key)?;
    let state = State {
        status: status.into(),
        user: request.user.clone(),
        data: "{}".into(),
        version: current.map_or(0, |s| s.version) + 1,
        rule_version: RULE_VERSION.into(),
        updated_at_ms: 0,
    };
    tx.put_state(&request.key, &state)?;
    tx.append_log(LogEntry {
        seq: 0,
        request: request.clone(),
        outcome: Outcome::Transition {
            status: status.into(),
            data: "{}".into(),
        },
        state_version: state.version,
        rule_version: RULE_VERSION.into(),
        applied_at_ms: 0,
    })?;
    Ok(())
}

fn pairs_in_one_batch(c: &mut Criterion) {
    let mut store = PartitionStore::open(&Location::Memory, 0, Durability::None, 1_000).unwrap();
    let mut round = 0u64;
    c.bench_function(
        "store/group commit of 128 reserve + associate pairs sharing the batch (route, 2 states, 2 log entries)",
        |b| {
            b.iter(|| {
                round += 1;
                store
                    .write_batch(|tx| {
                        for i in 0..128u64 {
                            let n = round * 128 + i;
                            let mut reserve = request("reserve");
                            reserve.key = format!("k-{}", n % 100_000);
                            reserve.user = format!("u-{}", n % 100_000);
                            tx.record_route(
                                &reserve.user,
                                &Route {
                                    key: reserve.key.clone(),
                                    recorded_at_ms: reserve.received_at_ms,
                                },
                            )?;
                            apply(tx, &reserve, "reserved")?;
                            let mut associate = reserve.clone();
                            associate.kind = "associate".into();
                            associate.key = tx.route(&associate.user)?.expect("just recorded").key;
                            apply(tx, &associate, "associated")?;
                        }
                        Ok(())
                    })
                    .unwrap()
            })
        },
    );
}

criterion_group!(
    pieces,
    partitioner,
    rule_call,
    group_commit,
    pairs_in_one_batch
);
criterion_main!(pieces);
