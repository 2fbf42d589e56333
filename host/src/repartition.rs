//! `turnstile repartition`: moves a stopped data dir to another number of partitions or another
//! hash, all or nothing.
//!
//! Every record is re-homed to the partition its key has in the new layout: states by key,
//! routes by the key they point to, dedup entries by their decision's key, log entries and dead
//! letters by their request's key (renumbered per new partition, each key's entries kept in their
//! original order). A user with routes in several old partitions (they reserved several keys over
//! time) keeps only the newest, and a client id found in several partitions keeps only its
//! newest entry, both judged by the record order the store wrote them with (see [`crate::store`]).
//! The running rule version comes along: `rules/installed.json` is rewritten for the new count
//! (refused while a canary runs different versions on different partitions).
//!
//! The new files are written into a new generation directory and synced; then they are reopened
//! and what they hold is counted against what was meant to be written (and states and log
//! entries against what the old files held); only then is `turnstile.json` replaced
//! (atomically), which is the single commit point. The old generation is deleted after the
//! commit.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::router::{HashKind, Partitioner};
use crate::store::{
    self, DEAD_LETTERS, DEDUP, DEDUP_ORDER, DeadLetter, LOG, Layout, LogEntry, META, ROUTES,
    STATES, StoredDedup, StoredRoute,
};

/// What a repartition moved, as counted in the new generation's files.
#[derive(Debug, Clone)]
pub struct Report {
    /// The layout before.
    pub old: Layout,
    /// The layout after.
    pub new: Layout,
    /// Keys with a state.
    pub states: u64,
    /// Routes (one per user).
    pub routes: u64,
    /// Dedup entries (one per client id).
    pub dedup: u64,
    /// Log entries.
    pub log: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Older routes and dedup entries dropped because a newer one for the same user or id
    /// existed in another partition.
    pub superseded: u64,
    /// The rule version every partition runs, if the data dir has installed rules.
    pub rule_version: Option<String>,
    /// How long it took.
    pub elapsed: Duration,
}

/// Rows bound for each new partition, as (key bytes, value bytes) in the order they must be
/// written; sequence-keyed tables are renumbered on write.
type Rows = Vec<Vec<(Vec<u8>, Vec<u8>)>>;

/// The newest record seen so far for one user or client id.
struct Newest {
    /// (record order, route time) — the second only breaks ties between records written before
    /// orders existed.
    rank: (u64, u64),
    /// Its partition in the new layout.
    home: usize,
    /// Position in the old files (partition, position), to keep the dedup retention order.
    position: (usize, u64),
    /// The stored bytes.
    value: Vec<u8>,
}

/// Keeps `candidate` for `id` if it is newer than what `newest` holds; counts the loser.
fn keep_newest(
    newest: &mut HashMap<String, Newest>,
    id: &str,
    candidate: Newest,
    superseded: &mut u64,
) {
    match newest.get(id) {
        Some(current) if current.rank >= candidate.rank => *superseded += 1,
        Some(_) => {
            *superseded += 1;
            newest.insert(id.to_string(), candidate);
        }
        None => {
            newest.insert(id.to_string(), candidate);
        }
    }
}

/// Moves `dir` to `partitions` partitions hashed with `hash`. `progress` gets one line per step.
pub fn repartition(
    dir: &Path,
    partitions: u32,
    hash: HashKind,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Report> {
    let started = Instant::now();
    ensure!(partitions >= 2, "a layout needs at least 2 partitions");
    let old = store::read_layout(dir)?.with_context(|| {
        format!(
            "{} is not a turnstile data dir (no turnstile.json)",
            dir.display()
        )
    })?;
    if old.partitions == partitions && old.hash == hash {
        bail!(
            "{} already has {partitions} partitions hashed with `{}`; nothing to do",
            dir.display(),
            hash.name()
        );
    }
    let installed = InstalledRules::read(dir)?;
    let rule_version = installed.as_ref().map(|i| i.version.clone());
    let new = Layout {
        format: store::FORMAT,
        partitions,
        hash,
        generation: old.generation + 1,
    };
    let partitioner = Partitioner::new(hash, partitions);
    let home = |key: &str| partitioner.partition(key) as usize;
    let n = partitions as usize;

    let old_dir = store::generation_dir(dir, old.generation);
    let mut olds = Vec::new();
    for p in 0..old.partitions {
        let path = store::partition_path(&old_dir, p);
        // Opening for writing takes redb's lock: a running server holds it. An existing file is
        // opened, never re-created; a missing or empty one stops the repartition.
        let db = store::open_existing(&path)?;
        let damage = store::scan(&db, 5);
        ensure!(
            damage.is_empty(),
            "{} is damaged: {}; nothing was changed ({})",
            path.display(),
            damage
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; "),
            store::DAMAGE_RECOVERY
        );
        olds.push(db);
    }

    let mut states: Rows = vec![Vec::new(); n];
    let mut logs: Rows = vec![Vec::new(); n];
    let mut dead: Rows = vec![Vec::new(); n];
    let mut routes: HashMap<String, Newest> = HashMap::new();
    let mut dedup: HashMap<String, Newest> = HashMap::new();
    // Where each log entry lands, (old partition, old seq) → its seq in its new partition, so a
    // retry of a moved request answers with its new position, not another request's.
    let mut new_seqs: HashMap<(u32, u64), u64> = HashMap::new();
    let mut superseded = 0;
    let mut last_order = 0;
    let (mut old_states, mut old_log, mut old_dead) = (0, 0, 0);
    for (p, db) in olds.iter().enumerate() {
        let txn = db.begin_read()?;
        let state_table = txn.open_table(STATES)?;
        old_states += state_table.len()?;
        for row in state_table.iter()? {
            let (key, value) = row?;
            states[home(key.value())]
                .push((key.value().as_bytes().to_vec(), value.value().to_vec()));
        }
        for row in txn.open_table(ROUTES)?.iter()? {
            let (user, value) = row?;
            let stored: StoredRoute = store::decode(user.value(), value.value())?;
            let candidate = Newest {
                rank: (stored.order, stored.route.recorded_at_ms),
                home: home(&stored.route.key),
                position: (p, 0),
                value: value.value().to_vec(),
            };
            keep_newest(&mut routes, user.value(), candidate, &mut superseded);
        }
        let dedup_table = txn.open_table(DEDUP)?;
        for row in txn.open_table(DEDUP_ORDER)?.iter()? {
            let (seq, id) = row?;
            let Some(value) = dedup_table.get(id.value())? else {
                continue;
            };
            let stored: StoredDedup = store::decode(id.value(), value.value())?;
            let candidate = Newest {
                rank: (stored.order, 0),
                home: home(&stored.entry.decision.key),
                position: (p, seq.value()),
                value: value.value().to_vec(),
            };
            keep_newest(&mut dedup, id.value(), candidate, &mut superseded);
        }
        let log_table = txn.open_table(LOG)?;
        old_log += log_table.len()?;
        for row in log_table.iter()? {
            let (seq, value) = row?;
            let entry: LogEntry = store::decode(&seq.value(), value.value())?;
            let rows = &mut logs[home(&entry.request.key)];
            new_seqs.insert((p as u32, seq.value()), rows.len() as u64 + 1);
            rows.push((Vec::new(), store::encode(&0, &entry)));
        }
        let dead_table = txn.open_table(DEAD_LETTERS)?;
        old_dead += dead_table.len()?;
        for row in dead_table.iter()? {
            let (seq, value) = row?;
            let letter: DeadLetter = store::decode(&seq.value(), value.value())?;
            dead[home(&letter.request.key)].push((Vec::new(), store::encode(&0, &letter)));
        }
        if let Ok(meta) = txn.open_table(META)
            && let Some(order) = meta.get("last_order")?
        {
            last_order = last_order.max(order.value());
        }
        progress(&format!("read partition {}/{}", p + 1, old.partitions));
    }

    // Routes and dedup entries, per new partition; dedup entries oldest first, since the
    // retention forgets from the front.
    let mut route_rows: Rows = vec![Vec::new(); n];
    for (user, newest) in routes {
        route_rows[newest.home].push((user.into_bytes(), newest.value));
    }
    let mut dedup_sorted: Vec<(String, Newest)> = dedup.into_iter().collect();
    dedup_sorted.sort_by_key(|(_, d)| (d.rank, d.position));
    let mut dedup_rows: Rows = vec![Vec::new(); n];
    for (id, newest) in dedup_sorted {
        dedup_rows[newest.home].push((id.into_bytes(), newest.value));
    }
    let planned = |rows: &Rows| rows.iter().map(|r| r.len() as u64).sum::<u64>();
    let plan = Counts {
        states: planned(&states),
        routes: planned(&route_rows),
        dedup: planned(&dedup_rows),
        log: planned(&logs),
        dead_letters: planned(&dead),
    };
    ensure!(
        plan.states == old_states && plan.log == old_log && plan.dead_letters == old_dead,
        "read {} states, {} log entries and {} dead letters but the files hold {old_states}, {old_log} and {old_dead}; nothing was changed",
        plan.states,
        plan.log,
        plan.dead_letters
    );

    let new_dir = store::generation_dir(dir, new.generation);
    if new_dir.exists() {
        // Left by an interrupted repartition; never committed, since the layout names the old one.
        std::fs::remove_dir_all(&new_dir)
            .with_context(|| format!("removing the unfinished {}", new_dir.display()))?;
    }
    std::fs::create_dir_all(&new_dir).with_context(|| format!("creating {}", new_dir.display()))?;
    for p in 0..n {
        let path = store::partition_path(&new_dir, p as u32);
        let db = Database::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let txn = db.begin_write()?;
        {
            insert_str(&mut txn.open_table(STATES)?, &states[p])?;
            insert_str(&mut txn.open_table(ROUTES)?, &route_rows[p])?;
            let mut dedup_table = txn.open_table(DEDUP)?;
            let mut order = txn.open_table(DEDUP_ORDER)?;
            for (seq, (id, value)) in dedup_rows[p].iter().enumerate() {
                let id = std::str::from_utf8(id)?;
                // A retry answers with where the request lives now: its partition and its log
                // entry's new position. An entry the log's retention had already removed has
                // no position any more: 0, never another request's.
                let mut stored: StoredDedup = store::decode(id, value)?;
                let decision = &mut stored.entry.decision;
                decision.seq = new_seqs
                    .get(&(decision.partition, decision.seq))
                    .copied()
                    .unwrap_or(0);
                decision.partition = p as u32;
                dedup_table.insert(id, store::encode(id, &stored).as_slice())?;
                order.insert(seq as u64 + 1, id)?;
            }
            let mut log = txn.open_table(LOG)?;
            for (i, (_, value)) in logs[p].iter().enumerate() {
                let mut entry: LogEntry = store::decode(&0, value)?;
                entry.seq = i as u64 + 1;
                log.insert(entry.seq, store::encode(&entry.seq, &entry).as_slice())?;
            }
            let mut dead_letters = txn.open_table(DEAD_LETTERS)?;
            for (i, (_, value)) in dead[p].iter().enumerate() {
                let mut letter: DeadLetter = store::decode(&0, value)?;
                letter.seq = i as u64 + 1;
                letter.partition = p as u32;
                dead_letters.insert(letter.seq, store::encode(&letter.seq, &letter).as_slice())?;
            }
            // Orders keep growing after the move.
            txn.open_table(META)?.insert("last_order", last_order)?;
        }
        // Immediate durability (the default): synced when commit returns.
        txn.commit()?;
        progress(&format!("wrote partition {}/{n}", p + 1));
    }
    std::fs::File::open(&new_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", new_dir.display()))?;
    drop(olds);

    // Count what the new generation really holds, read back from its files.
    let written = Counts::of(&new_dir, partitions)?;
    ensure!(
        written == plan,
        "the new generation {} holds {written:?} but {plan:?} were written; the old layout is kept",
        new_dir.display()
    );

    if let Some(installed) = &installed {
        // Before the commit point: should the switch below not happen, running the
        // repartition again finds every partition on the one version and rewrites it again.
        installed.write_for(dir, partitions)?;
    }
    store::write_layout(dir, &new).map_err(anyhow::Error::msg)?;
    progress("switched to the new layout");
    if let Err(e) = std::fs::remove_dir_all(&old_dir) {
        progress(&format!(
            "could not remove the old {}: {e}",
            old_dir.display()
        ));
    }
    Ok(Report {
        old,
        new,
        states: written.states,
        routes: written.routes,
        dedup: written.dedup,
        log: written.log,
        dead_letters: written.dead_letters,
        superseded,
        rule_version,
        elapsed: started.elapsed(),
    })
}

/// Rows per table, summed over a generation's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    states: u64,
    routes: u64,
    dedup: u64,
    log: u64,
    dead_letters: u64,
}

impl Counts {
    /// Counts what the files of `generation_dir` hold, opening each afresh.
    fn of(generation_dir: &Path, partitions: u32) -> anyhow::Result<Counts> {
        let mut counts = Counts {
            states: 0,
            routes: 0,
            dedup: 0,
            log: 0,
            dead_letters: 0,
        };
        for p in 0..partitions {
            let db = store::open_existing(&store::partition_path(generation_dir, p))?;
            let txn = db.begin_read()?;
            counts.states += txn.open_table(STATES)?.len()?;
            counts.routes += txn.open_table(ROUTES)?.len()?;
            counts.dedup += txn.open_table(DEDUP)?.len()?;
            counts.log += txn.open_table(LOG)?.len()?;
            counts.dead_letters += txn.open_table(DEAD_LETTERS)?.len()?;
        }
        Ok(counts)
    }
}

/// `rules/installed.json` of a data dir whose partitions all run one version. Read as plain
/// JSON (only `running`, the version per partition, is interpreted) so every other field the
/// rule registry keeps, such as the history, comes through unchanged.
struct InstalledRules {
    /// The whole file.
    json: serde_json::Value,
    /// The version every partition runs.
    version: String,
}

impl InstalledRules {
    fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("rules").join("installed.json")
    }

    /// Reads the file, if the data dir has one; refuses while partitions run different
    /// versions (a canary), since the new partitions could not be mapped onto them.
    fn read(dir: &Path) -> anyhow::Result<Option<InstalledRules>> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        let running: Vec<String> = json
            .get("running")
            .and_then(|r| serde_json::from_value(r.clone()).ok())
            .with_context(|| format!("{} has no `running` list", path.display()))?;
        let Some(version) = running.first().cloned() else {
            return Ok(None);
        };
        if running.iter().any(|v| *v != version) {
            let mut versions = running.clone();
            versions.sort();
            versions.dedup();
            bail!(
                "a canary is in progress: the partitions run {} different rule versions ({}); \
                 promote it (PUT /v1/admin/rule without ?partitions) or roll it back \
                 (POST /v1/admin/rule/rollback) so every partition runs one version, then repartition; \
                 nothing was changed",
                versions.len(),
                versions.join(", ")
            );
        }
        Ok(Some(InstalledRules { json, version }))
    }

    /// Writes the file with every one of `partitions` partitions on the version, atomically.
    fn write_for(&self, dir: &Path, partitions: u32) -> anyhow::Result<()> {
        use std::io::Write;
        let mut json = self.json.clone();
        json["running"] = serde_json::json!(vec![self.version.clone(); partitions as usize]);
        let path = Self::path(dir);
        let tmp = path.with_extension("json.repartition");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(&json).expect("JSON"))?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(path.parent().expect("rules dir"))?.sync_all()
        };
        write().with_context(|| format!("writing {}", path.display()))
    }
}

fn insert_str(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    rows: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<()> {
    for (key, value) in rows {
        table.insert(std::str::from_utf8(key)?, value.as_slice())?;
    }
    Ok(())
}
