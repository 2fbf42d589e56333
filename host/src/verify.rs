//! `turnstile verify`: checks every record of a stopped data dir for damage (checksum mismatch,
//! undecodable bytes, redb structure it cannot walk) and names each damaged file and key, so an
//! operator knows what to restore before starting the server on it.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::store::{self, Damage};

/// Most findings listed per partition file; one is enough to refuse it, the rest help decide
/// between restoring the file and giving up some keys.
const FINDINGS_PER_FILE: usize = 1000;

/// What `verify` found in one partition file.
#[derive(Debug, Clone)]
pub struct FileReport {
    /// The partition file.
    pub path: PathBuf,
    /// Damage found; empty when the file is healthy. A file that cannot be opened at all has
    /// one finding for table `file`.
    pub damage: Vec<Damage>,
}

/// Verifies every partition file of the data dir `dir`. The server must be stopped (redb's lock
/// keeps a running one's files out). Opening a file left by a crash runs redb's recovery, as a
/// server start would.
pub fn verify(dir: &Path) -> anyhow::Result<Vec<FileReport>> {
    let layout = store::read_layout(dir)?.with_context(|| {
        format!(
            "{} is not a turnstile data dir (no {})",
            dir.display(),
            store::LAYOUT_FILE
        )
    })?;
    let generation = store::generation_dir(dir, layout.generation);
    let mut reports = Vec::new();
    for p in 0..layout.partitions {
        let path = store::partition_path(&generation, p);
        let damage = match store::open_existing(&path) {
            Ok(db) => store::scan(&db, FINDINGS_PER_FILE),
            Err(e) if e.is_damage() => vec![Damage {
                table: "file".into(),
                key: None,
                problem: e.message,
            }],
            Err(e) => return Err(anyhow::anyhow!(e.message)),
        };
        reports.push(FileReport { path, damage });
    }
    Ok(reports)
}

/// Removes every damaged record of every partition file of the stopped data dir `dir` (the
/// quarantined ones), after the operator chose to give them up rather than restore the file.
/// A file whose structure is damaged is left as it is (restore it from a backup). Returns the
/// report of what was found, and how many records were removed.
pub fn drop_damaged(dir: &Path) -> anyhow::Result<(Vec<FileReport>, usize)> {
    let reports = verify(dir)?;
    let mut removed = 0;
    for report in &reports {
        if report.damage.is_empty() || report.damage.iter().any(|d| d.key.is_none()) {
            continue;
        }
        let db = store::open_existing(&report.path).map_err(|e| anyhow::anyhow!(e.message))?;
        removed += store::drop_records(&db, &report.damage)
            .map_err(|e| anyhow::anyhow!(e.message))
            .with_context(|| format!("removing damaged records from {}", report.path.display()))?;
    }
    Ok((reports, removed))
}

/// The report as text: one line per healthy file, one per finding otherwise.
pub fn render(reports: &[FileReport]) -> String {
    let mut out = String::new();
    for report in reports {
        if report.damage.is_empty() {
            out.push_str(&format!("ok {}\n", report.path.display()));
        }
        for damage in &report.damage {
            out.push_str(&format!("damaged {}: {damage}\n", report.path.display()));
        }
    }
    out
}
