//! Routing: which partition owns a key, and which key a user's request belongs to.
//!
//! The partition of a key is `abs(hash(key)) % N` (patent claim 4). Two hash functions:
//!
//! * `java`: Java's `String.hashCode`, computed exactly as the JVM does (over UTF-16 code units,
//!   wrapping `i32` arithmetic), so a Java service and Turnstile agree. The absolute value is taken
//!   without overflow: Java's `Math.abs(Integer.MIN_VALUE)` is still negative, which would give a
//!   negative partition; here `|i32::MIN|` is 2^31.
//! * `murmur2`: Kafka's default partitioner (`murmur2(key bytes) & 0x7fffffff`), so a Kafka
//!   producer with default settings writes a key to the partition Turnstile expects.
//!
//! The route cache maps user → key (claims 3, 5, 7). A keyed request is recorded in it
//! provisionally *before* it is routed; the partition that applies the request confirms the route
//! with the record order it stored it under, so the route is the one the last *applied* request
//! made, by the order of application rather than any clock. It is consulted for requests that
//! carry only a user. It is a bounded, sharded in-memory cache; the partitions' stores hold every
//! route durably, so the cache may forget an entry (when full) without losing the route: a miss
//! is answered by reading the partitions' stores.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Which hash function picks a key's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HashKind {
    /// Java's `String.hashCode`, with an overflow-free absolute value.
    #[default]
    Java,
    /// Kafka's default partitioner: murmur2 of the UTF-8 bytes, masked to 31 bits.
    Murmur2,
}

impl HashKind {
    /// The name used in the configuration and the data dir's metadata.
    pub fn name(self) -> &'static str {
        match self {
            HashKind::Java => "java",
            HashKind::Murmur2 => "murmur2",
        }
    }
}

/// Maps keys to partitions: `abs(hash(key)) % partitions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitioner {
    hash: HashKind,
    partitions: u32,
}

impl Partitioner {
    /// A partitioner over `partitions` partitions. Panics if `partitions` is 0, which the
    /// configuration refuses before this is reached.
    pub fn new(hash: HashKind, partitions: u32) -> Partitioner {
        assert!(partitions > 0, "a partitioner needs at least one partition");
        Partitioner { hash, partitions }
    }

    /// N.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The hash function.
    pub fn hash(&self) -> HashKind {
        self.hash
    }

    /// The partition that owns `key`, always `< N`.
    pub fn partition(&self, key: &str) -> u32 {
        let positive: u32 = match self.hash {
            HashKind::Java => java_string_hash(key).unsigned_abs(),
            HashKind::Murmur2 => (murmur2(key.as_bytes()) & 0x7fff_ffff) as u32,
        };
        positive % self.partitions
    }
}

/// Java's `String.hashCode`: `s[0]*31^(n-1) + ... + s[n-1]` over UTF-16 code units, in wrapping
/// 32-bit arithmetic. Characters outside the BMP count as their two surrogates, as in Java.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16().fold(0i32, |h, unit| {
        h.wrapping_mul(31).wrapping_add(i32::from(unit))
    })
}

/// Kafka's `Utils.murmur2` (seed `0x9747b28c`), bit for bit.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// A user's route: the key of their latest keyed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The key (reservation number).
    pub key: String,
    /// When the route was recorded (host time, ms since the Unix epoch); the TTL counts from here.
    /// Never used to tell which of two routes is newer: clocks step back.
    pub recorded_at_ms: u64,
}

/// What the cache holds for one user.
#[derive(Debug)]
struct Entry {
    /// The route the applied requests left (`None` while the user has only provisional ones).
    route: Option<Route>,
    /// The record order of `route` (see [`crate::store`]): a newer route has a higher order,
    /// whatever the clock said.
    order: u64,
    /// Keyed requests of this user recorded before routing (claim 5) whose outcome is not in
    /// yet, oldest first, each with the token of its [`Provisional`]. While there are any, the
    /// newest routes the user's user-only requests, which so follow it into its partition's
    /// queue; once it is withdrawn the route is again what the applied requests made it.
    provisional: Vec<(u64, Route)>,
}

/// The in-memory route cache: user → key, bounded, with a TTL.
///
/// A keyed request is recorded *provisionally* before it is routed ([`RouteCache::provisional`]);
/// the partition that applies it confirms the route with the record order it stored it under
/// ([`RouteCache::confirm`]), and a request that was not applied leaves the route as it was. So
/// the route is always the one the last *applied* keyed request recorded.
#[derive(Debug)]
pub struct RouteCache {
    /// Independent locks so concurrent HTTP handlers rarely contend.
    shards: Box<[Mutex<HashMap<String, Entry>>]>,
    /// Picks a user's shard; random per process so users cannot aim at one shard.
    shard_hasher: RandomState,
    /// Most entries one shard holds before it evicts.
    shard_capacity: usize,
    /// Numbers the provisional records, so each withdraws only itself.
    next_token: std::sync::atomic::AtomicU64,
    /// Routes older than this are gone (as if never recorded).
    ttl_ms: u64,
}

/// A keyed request recorded before routing; dropping it (whatever the outcome) withdraws the
/// provisional record. The route itself only changes through [`RouteCache::confirm`].
#[must_use = "the provisional record lasts as long as this value"]
pub struct Provisional<'a> {
    /// The cache it was recorded in.
    cache: &'a RouteCache,
    /// Whose request it is.
    user: String,
    /// Which of the user's provisional records it is.
    token: u64,
}

impl Drop for Provisional<'_> {
    fn drop(&mut self) {
        let mut shard = self.cache.lock(&self.user);
        if let Some(entry) = shard.get_mut(&self.user) {
            entry.provisional.retain(|(token, _)| *token != self.token);
            if entry.provisional.is_empty() && entry.route.is_none() {
                shard.remove(&self.user);
            }
        }
    }
}

impl RouteCache {
    /// A cache holding about `capacity` routes for `ttl_ms` each.
    pub fn new(capacity: usize, ttl_ms: u64) -> RouteCache {
        let shard_count = 64usize.min(capacity.max(1));
        RouteCache {
            shards: (0..shard_count).map(|_| Mutex::default()).collect(),
            shard_hasher: RandomState::new(),
            shard_capacity: capacity.div_ceil(shard_count).max(1),
            next_token: std::sync::atomic::AtomicU64::new(0),
            ttl_ms,
        }
    }

    fn lock(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        let index = self.shard_hasher.hash_one(user) as usize % self.shards.len();
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a route recorded at `recorded_at_ms` is still alive at `now_ms`.
    pub fn is_live(&self, recorded_at_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(recorded_at_ms) < self.ttl_ms
    }

    /// The user's entry, made room for if new.
    fn entry<'s>(
        &self,
        shard: &'s mut HashMap<String, Entry>,
        user: &str,
        now_ms: u64,
    ) -> &'s mut Entry {
        let known = shard.contains_key(user);
        if !known && shard.len() >= self.shard_capacity {
            // Full: drop the expired, and if that is not enough an eighth of the rest. Evicting
            // a live route costs only a slower lookup later, since the stores keep every route.
            shard.retain(|_, e| {
                !e.provisional.is_empty()
                    || e.route
                        .as_ref()
                        .is_some_and(|r| self.is_live(r.recorded_at_ms, now_ms))
            });
            if shard.len() >= self.shard_capacity {
                let mut n = 0usize;
                shard.retain(|_, _| {
                    n += 1;
                    !n.is_multiple_of(8)
                });
            }
        }
        // Looked up first so that a known user (the common case) costs no key allocation.
        if !known {
            shard.insert(
                user.to_string(),
                Entry {
                    route: None,
                    order: 0,
                    provisional: Vec::new(),
                },
            );
        }
        shard.get_mut(user).expect("inserted above")
    }

    /// Claim 5: records `user → route` for a keyed request about to be routed, before it is.
    /// Until it is dropped, the user's lookups find it (the newest such record wins); the route
    /// the applied requests made changes only when a partition applied the request and confirmed
    /// it ([`RouteCache::confirm`]).
    pub fn provisional(&self, user: &str, route: Route) -> Provisional<'_> {
        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut shard = self.lock(user);
        self.entry(&mut shard, user, route.recorded_at_ms)
            .provisional
            .push((token, route));
        Provisional {
            cache: self,
            user: user.to_string(),
            token,
        }
    }

    /// Records `user → route` as stored under record order `order` (by the partition that
    /// applied the request, or read back from a store): it replaces the cached route only if it
    /// is newer by that order, so the last applied request wins and a clock step does not matter.
    pub fn confirm(&self, user: &str, route: Route, order: u64) {
        let mut shard = self.lock(user);
        let entry = self.entry(&mut shard, user, route.recorded_at_ms);
        // Order 0 is a route stored before orders existed: only its time can place it.
        let newer = match &entry.route {
            None => true,
            Some(cached) if order == 0 && entry.order == 0 => {
                route.recorded_at_ms >= cached.recorded_at_ms
            }
            Some(_) => order > entry.order,
        };
        if newer {
            entry.route = Some(route);
            entry.order = order;
        }
    }

    /// Sets the user's route whatever the cache held: for a caller that records routes in the
    /// order they happened (Kafka mode, which reads them back in its routes topic's order, and
    /// the benchmark's equal-work baseline).
    pub fn record(&self, user: &str, route: Route) {
        let mut shard = self.lock(user);
        let entry = self.entry(&mut shard, user, route.recorded_at_ms);
        entry.route = Some(route);
    }

    /// The user's live route, if the cache has it: the newest provisional record while there
    /// is one, else the route the applied requests made.
    pub fn lookup(&self, user: &str, now_ms: u64) -> Option<Route> {
        let shard = self.lock(user);
        let entry = shard.get(user)?;
        match entry.provisional.last() {
            Some((_, route)) => Some(route.clone()),
            None => entry
                .route
                .as_ref()
                .filter(|r| self.is_live(r.recorded_at_ms, now_ms))
                .cloned(),
        }
    }

    /// How many users the cache holds an entry for (live or not yet evicted).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether the cache holds no route.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (key, `key.hashCode()`) pairs printed by a real JVM (OpenJDK 17): ASCII, CJK, characters
    /// outside the BMP, a NUL, and three keys whose hash is `Integer.MIN_VALUE`.
    fn java_vectors() -> Vec<(String, i32)> {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../tests_data/java_hash_vectors.json")).unwrap();
        doc["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v[0].as_str().unwrap().to_string(),
                    v[1].as_i64().unwrap() as i32,
                )
            })
            .collect()
    }

    #[test]
    fn java_hash_matches_the_jvm() {
        let vectors = java_vectors();
        assert_eq!(vectors.len(), 19);
        for (s, expected) in &vectors {
            assert_eq!(java_string_hash(s), *expected, "hashCode of {s:?}");
        }
        assert_eq!(vectors.iter().filter(|(_, h)| *h == i32::MIN).count(), 3);
    }

    /// `"polygenelubricants".hashCode()` is `Integer.MIN_VALUE`: Java's `Math.abs` would leave it
    /// negative; the partition must still be in range and equal 2^31 mod N.
    #[test]
    fn min_value_hash_is_not_negative() {
        assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
        for n in [2u32, 3, 4, 7, 12, 1000] {
            let p = Partitioner::new(HashKind::Java, n);
            assert_eq!(
                p.partition("polygenelubricants"),
                ((1u64 << 31) % u64::from(n)) as u32
            );
        }
    }

    /// Values from Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (data, expected) in cases {
            assert_eq!(
                murmur2(data),
                *expected,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn murmur2_partition_is_kafka_to_positive_mod_n() {
        let p = Partitioner::new(HashKind::Murmur2, 12);
        // toPositive(-973932308) % 12, as Kafka's DefaultPartitioner computes it.
        assert_eq!(
            p.partition("21"),
            ((-973932308i32 & 0x7fffffff) % 12) as u32
        );
    }

    #[test]
    fn every_partition_is_in_range() {
        for hash in [HashKind::Java, HashKind::Murmur2] {
            for n in [2u32, 3, 5, 12, 64] {
                let p = Partitioner::new(hash, n);
                let mut seen = vec![false; n as usize];
                for i in 0..5000 {
                    let key = format!("key-{i}-é-中-😀");
                    let partition = p.partition(&key);
                    assert!(partition < n);
                    seen[partition as usize] = true;
                }
                for (s, _) in java_vectors() {
                    assert!(p.partition(&s) < n);
                }
                assert!(
                    seen.iter().all(|s| *s),
                    "{hash:?} with {n}: some partition unused"
                );
            }
        }
    }

    fn route(key: &str, at: u64) -> Route {
        Route {
            key: key.to_string(),
            recorded_at_ms: at,
        }
    }

    #[test]
    fn route_cache_ttl_and_recency() {
        let cache = RouteCache::new(100, 1000);
        cache.confirm("u", route("k1", 10), 1);
        assert_eq!(cache.lookup("u", 500).unwrap().key, "k1");
        cache.confirm("u", route("k2", 20), 3);
        cache.confirm("u", route("k0", 30), 2); // applied before k2: ignored
        assert_eq!(cache.lookup("u", 500).unwrap().key, "k2");
        assert!(cache.lookup("u", 1020).is_none(), "expired after the TTL");
        assert!(cache.lookup("nobody", 0).is_none());
    }

    /// Item 7 of issue 12: after the clock steps back, the route applied last still wins, and an
    /// older route (read back from a store) never replaces it.
    #[test]
    fn clock_step_back_does_not_make_a_stale_route_win() {
        let cache = RouteCache::new(100, 60_000);
        cache.confirm("u", route("before-step", 50_000), 7);
        cache.confirm("u", route("after-step", 10_000), 8); // the clock went back 40 s
        assert_eq!(cache.lookup("u", 10_001).unwrap().key, "after-step");
        cache.confirm("u", route("before-step", 50_000), 7); // a store's copy, read late
        assert_eq!(cache.lookup("u", 10_001).unwrap().key, "after-step");
    }

    /// A provisional record routes while it lasts, the newest first; withdrawn, it leaves the
    /// route the applied requests made, and nothing behind for a user with none.
    #[test]
    fn provisional_records_route_until_withdrawn() {
        let cache = RouteCache::new(100, 60_000);
        cache.confirm("u", route("applied", 10), 1);
        let first = cache.provisional("u", route("first", 20));
        let second = cache.provisional("u", route("second", 21));
        assert_eq!(cache.lookup("u", 30).unwrap().key, "second");
        drop(second);
        assert_eq!(cache.lookup("u", 30).unwrap().key, "first");
        drop(first);
        assert_eq!(cache.lookup("u", 30).unwrap().key, "applied");
        let pending = cache.provisional("new-user", route("pending", 20));
        assert_eq!(cache.lookup("new-user", 30).unwrap().key, "pending");
        drop(pending);
        assert!(cache.lookup("new-user", 30).is_none());
        assert_eq!(cache.len(), 1, "the withdrawn user has no entry left");
    }

    #[test]
    fn route_cache_is_bounded() {
        let cache = RouteCache::new(1000, u64::MAX);
        for i in 0..50_000u64 {
            cache.confirm(&format!("user-{i}"), route(&format!("k{i}"), i), i + 1);
        }
        assert!(cache.len() <= 1000 + 64, "len {}", cache.len());
        assert_eq!(cache.lookup("user-49999", 0).unwrap().key, "k49999");
    }
}
