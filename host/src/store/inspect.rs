//! `turnstile inspect`: the records of a stopped data dir as JSON lines, whatever their encoding
//! on disk (binary since format 3, JSON before), so partition files stay readable by people and
//! by `jq`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    CHECKPOINTS, DEAD_LETTERS, DEDUP, DEDUP_ORDER, DeadLetter, LOG, LogEntry, META, ROUTES, STATES,
    Stored, StoredDedup, StoredRoute,
};
use crate::model::State;

/// Every table `inspect` prints, in the order it prints them.
pub const TABLES: [&str; 8] = [
    "states",
    "routes",
    "dedup",
    "dedup_order",
    "log",
    "dead_letters",
    "meta",
    "checkpoints",
];

/// Which records to print; `None` is every one.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this partition.
    pub partition: Option<u32>,
    /// Only this table (one of [`TABLES`]).
    pub table: Option<String>,
    /// Only this key (a sequence number for `log`, `dead_letters` and `dedup_order`).
    pub key: Option<String>,
}

/// Writes the records of the stopped data dir `dir` that `filter` selects to `out`, one JSON
/// object a line: `{"partition","table","key","value"}`, or `"damaged"` with the problem instead
/// of `"value"` for a record whose checksum or decoding fails. Returns how many lines it wrote.
pub fn inspect(dir: &Path, filter: &Filter, out: &mut impl Write) -> anyhow::Result<u64> {
    if let Some(table) = &filter.table
        && !TABLES.contains(&table.as_str())
    {
        anyhow::bail!("unknown table `{table}`; tables are {}", TABLES.join(", "));
    }
    let layout = super::read_layout(dir)?.with_context(|| {
        format!(
            "{} is not a turnstile data dir (no {})",
            dir.display(),
            super::LAYOUT_FILE
        )
    })?;
    if let Some(p) = filter.partition
        && p >= layout.partitions
    {
        anyhow::bail!(
            "partition {p} does not exist: {} has {} partitions",
            dir.display(),
            layout.partitions
        );
    }
    let generation = super::generation_dir(dir, layout.generation);
    let mut lines = 0;
    for p in 0..layout.partitions {
        if filter.partition.is_some_and(|only| only != p) {
            continue;
        }
        let path = super::partition_path(&generation, p);
        let db = super::open_existing(&path).map_err(|e| anyhow::anyhow!(e.message))?;
        let txn = db
            .begin_read()
            .map_err(super::db_error)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let mut printer = Printer {
            partition: p,
            filter,
            out: &mut *out,
            lines: 0,
        };
        printer
            .all(&txn)
            .with_context(|| format!("reading {}", path.display()))?;
        lines += printer.lines;
    }
    out.flush()?;
    Ok(lines)
}

/// Prints one partition's records.
struct Printer<'a, W: Write> {
    partition: u32,
    filter: &'a Filter,
    out: &'a mut W,
    /// Lines written so far.
    lines: u64,
}

impl<W: Write> Printer<'_, W> {
    fn wants(&self, table: &str) -> bool {
        self.filter.table.as_deref().is_none_or(|t| t == table)
    }

    fn line(&mut self, table: &str, key: Value, body: (&str, Value)) -> anyhow::Result<()> {
        let mut line = json!({"partition": self.partition, "table": table, "key": key});
        line[body.0] = body.1;
        serde_json::to_writer(&mut *self.out, &line)?;
        self.out.write_all(b"\n")?;
        self.lines += 1;
        Ok(())
    }

    fn all(&mut self, txn: &redb::ReadTransaction) -> anyhow::Result<()> {
        self.named::<State>(txn, "states", STATES)?;
        self.named::<StoredRoute>(txn, "routes", ROUTES)?;
        self.named::<StoredDedup>(txn, "dedup", DEDUP)?;
        if self.wants("dedup_order") {
            self.plain(txn, "dedup_order", DEDUP_ORDER, |id| json!(id))?;
        }
        self.numbered::<LogEntry>(txn, "log", LOG)?;
        self.numbered::<DeadLetter>(txn, "dead_letters", DEAD_LETTERS)?;
        if self.wants("meta") {
            self.plain(txn, "meta", META, |v| json!(v))?;
        }
        if self.wants("checkpoints") {
            let Some(table) = open(txn, CHECKPOINTS)? else {
                return Ok(());
            };
            for row in table.iter()? {
                let (key, value) = row?;
                let key = key.value();
                if self.filter.key.as_deref().is_some_and(|k| k != key) {
                    continue;
                }
                let body = match super::decode_json::<_, Value>(key, value.value()) {
                    Ok(v) => ("value", v),
                    Err(e) => ("damaged", json!(e.message)),
                };
                self.line("checkpoints", json!(key), body)?;
            }
        }
        Ok(())
    }

    /// A table keyed by name whose values are records of type `T`.
    fn named<T: Stored + Serialize>(
        &mut self,
        txn: &redb::ReadTransaction,
        name: &str,
        definition: TableDefinition<&str, &[u8]>,
    ) -> anyhow::Result<()> {
        if !self.wants(name) {
            return Ok(());
        }
        let Some(table) = open(txn, definition)? else {
            return Ok(());
        };
        let only = self.filter.key.clone();
        let mut print = |key: &str, bytes: &[u8]| -> anyhow::Result<()> {
            let body = record_body::<_, T>(key, bytes);
            self.line(name, json!(key), body)
        };
        match only {
            Some(key) => {
                if let Some(value) = table.get(key.as_str())? {
                    print(&key, value.value())?;
                }
            }
            None => {
                for row in table.iter()? {
                    let (key, value) = row?;
                    print(key.value(), value.value())?;
                }
            }
        }
        Ok(())
    }

    /// A table keyed by sequence number whose values are records of type `T`.
    fn numbered<T: Stored + Serialize>(
        &mut self,
        txn: &redb::ReadTransaction,
        name: &str,
        definition: TableDefinition<u64, &[u8]>,
    ) -> anyhow::Result<()> {
        if !self.wants(name) {
            return Ok(());
        }
        let Some(table) = open(txn, definition)? else {
            return Ok(());
        };
        let only = match &self.filter.key {
            Some(key) => match key.parse::<u64>() {
                Ok(seq) => Some(seq),
                // Not a sequence number: no record of this table has that key.
                Err(_) => return Ok(()),
            },
            None => None,
        };
        let range = match only {
            Some(seq) => table.range(seq..=seq)?,
            None => table.range::<u64>(..)?,
        };
        for row in range {
            let (seq, value) = row?;
            let seq = seq.value();
            let body = record_body::<_, T>(&seq, value.value());
            self.line(name, json!(seq), body)?;
        }
        Ok(())
    }

    /// A bookkeeping table whose values are plain redb values.
    fn plain<K, V>(
        &mut self,
        txn: &redb::ReadTransaction,
        name: &str,
        definition: TableDefinition<K, V>,
        show: impl Fn(V::SelfType<'_>) -> Value,
    ) -> anyhow::Result<()>
    where
        K: redb::Key + 'static,
        V: redb::Value + 'static,
        for<'k> K::SelfType<'k>: Serialize + ToString,
    {
        let Some(table) = open(txn, definition)? else {
            return Ok(());
        };
        for row in table.iter()? {
            let (key, value) = row?;
            let key = key.value();
            if self
                .filter
                .key
                .as_deref()
                .is_some_and(|k| k != key.to_string())
            {
                continue;
            }
            let key = json!(key);
            let value = show(value.value());
            self.line(name, key, ("value", value))?;
        }
        Ok(())
    }
}

/// A record's value as JSON, or what is wrong with it.
fn record_body<K: super::RecordKey + ?Sized, T: Stored + Serialize>(
    key: &K,
    bytes: &[u8],
) -> (&'static str, Value) {
    match super::decode::<_, T>(key, bytes) {
        Ok(value) => (
            "value",
            serde_json::to_value(&value).unwrap_or_else(|e| json!(e.to_string())),
        ),
        Err(e) => ("damaged", json!(e.message)),
    }
}

/// A table, or `None` for a file no batch has written to yet.
fn open<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    definition: TableDefinition<K, V>,
) -> anyhow::Result<Option<redb::ReadOnlyTable<K, V>>> {
    match txn.open_table(definition) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
