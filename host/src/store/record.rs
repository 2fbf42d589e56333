//! The binary encoding of stored values (data dir format 3): what a partition file's `states`,
//! `routes`, `dedup`, `log` and `dead_letters` values hold inside their checksummed frame.
//!
//! Hand-written rather than postcard or bincode: the stored types use serde features those
//! non-self-describing formats cannot decode (`#[serde(flatten)]` on [`StoredRoute`] and
//! [`StoredDedup`], the internally tagged [`Outcome`], `skip_serializing_if` on
//! [`DeadLetter`]), and the serde derives must stay as they are, because they define the JSON
//! of the API, of the Kafka changelog and of records written by data dir formats 1 and 2 (still
//! read). A dozen fields of strings and integers need nothing more than a varint and a
//! length-prefixed string; owning the encoding also lets it leave out what the record's key
//! already says (a log entry's or dead letter's sequence number, a dedup entry's id) and store
//! a rule version (a sha256 in hex) as its 32 bytes.
//!
//! Every value starts with a version byte ([`VERSION`]), so a later change of a type can be
//! read beside this one.
//!
//! The Kafka changelog's format 2 ([`crate::kafka::ChangelogRecord`]) writes its states, routes
//! and dedup entries with the same [`Binary`] encodings, framed by its own record header.

use crate::model::{Decision, Outcome, RoutedRequest, State, Verdict};
use crate::partition::RecordSource;
use crate::router::Route;

use super::{DeadLetter, DedupEntry, Failure, LogEntry, Resubmitted, StoredDedup, StoredRoute};

/// The first byte of every binary value: the version of the layout below.
const VERSION: u8 = 1;

/// The record key a value is decoded under, for the fields the encoding leaves out because the
/// key holds them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyRef<'a> {
    /// A key, user or client id (`states`, `routes`, `dedup`).
    Name(&'a str),
    /// A sequence number (`log`, `dead_letters`).
    Seq(u64),
}

impl KeyRef<'_> {
    fn seq(self) -> u64 {
        match self {
            KeyRef::Seq(seq) => seq,
            KeyRef::Name(_) => 0,
        }
    }
}

/// A value with a binary encoding.
pub(crate) trait Binary: Sized {
    /// Appends the encoding of `self`, stored under `key`, to `out`.
    fn write(&self, key: KeyRef<'_>, out: &mut Vec<u8>);
    /// Reads a value stored under `key`.
    fn read(key: KeyRef<'_>, input: &mut Reader<'_>) -> Result<Self, String>;
}

/// Appends the versioned encoding of `value`.
pub(crate) fn write_value<T: Binary>(value: &T, key: KeyRef<'_>, out: &mut Vec<u8>) {
    out.push(VERSION);
    value.write(key, out);
}

/// Reads a whole versioned value; trailing bytes are damage like any other.
pub(crate) fn read_value<T: Binary>(key: KeyRef<'_>, bytes: &[u8]) -> Result<T, String> {
    let mut input = Reader { bytes };
    match input.u8()? {
        VERSION => {}
        other => return Err(format!("unknown binary record version {other}")),
    }
    let value = T::read(key, &mut input)?;
    if !input.bytes.is_empty() {
        return Err(format!("{} bytes after the record", input.bytes.len()));
    }
    Ok(value)
}

pub(crate) fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    // LEB128: 7 bits a byte, so the small numbers that dominate (versions, lengths, partitions)
    // take one byte and a millisecond time six.
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_bool(out: &mut Vec<u8>, b: bool) {
    out.push(u8::from(b));
}

/// A signed number, zigzagged so that small negative numbers (an epoch of -1) stay short too.
pub(crate) fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// A rule version id or a request fingerprint is a sha256 in lowercase hex: stored as its 32
/// bytes (tag 1); anything else (an empty version of an old answer) as a string (tag 0).
fn put_version(out: &mut Vec<u8>, version: &str) {
    let bytes = version.as_bytes();
    if bytes.len() == 64 && bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        out.push(1);
        for pair in bytes.chunks(2) {
            out.push((hex_digit(pair[0]) << 4) | hex_digit(pair[1]));
        }
    } else {
        out.push(0);
        put_str(out, version);
    }
}

fn hex_digit(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'a' + 10,
    }
}

/// Reads a binary value; every read checks the bounds, so damaged bytes give an error, never a
/// panic or a huge allocation.
pub(crate) struct Reader<'a> {
    /// What is left to read.
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    /// Fails when anything is left: trailing bytes are damage like any other.
    pub(crate) fn finish(self) -> Result<(), String> {
        match self.bytes.len() {
            0 => Ok(()),
            n => Err(format!("{n} bytes after the record")),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.bytes.len() {
            return Err("record is truncated".to_string());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint is too long".to_string())
    }

    pub(crate) fn i64(&mut self) -> Result<i64, String> {
        let v = self.u64()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.u64()?).map_err(|_| "number out of range".to_string())
    }

    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("bad flag {other}")),
        }
    }

    pub(crate) fn string(&mut self) -> Result<String, String> {
        let len = usize::try_from(self.u64()?).map_err(|_| "length out of range".to_string())?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }

    fn version(&mut self) -> Result<String, String> {
        match self.u8()? {
            0 => self.string(),
            1 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let bytes = self.take(32)?;
                let mut s = String::with_capacity(64);
                for b in bytes {
                    s.push(HEX[usize::from(b >> 4)] as char);
                    s.push(HEX[usize::from(b & 15)] as char);
                }
                Ok(s)
            }
            other => Err(format!("bad version tag {other}")),
        }
    }

    pub(crate) fn option<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.bool()? {
            true => read(self).map(Some),
            false => Ok(None),
        }
    }
}

impl Binary for State {
    fn write(&self, _key: KeyRef<'_>, out: &mut Vec<u8>) {
        put_str(out, &self.status);
        put_str(out, &self.user);
        put_str(out, &self.data);
        put_u64(out, self.version);
        put_version(out, &self.rule_version);
        put_u64(out, self.updated_at_ms);
    }

    fn read(_key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(State {
            status: r.string()?,
            user: r.string()?,
            data: r.string()?,
            version: r.u64()?,
            rule_version: r.version()?,
            updated_at_ms: r.u64()?,
        })
    }
}

impl Binary for Route {
    fn write(&self, _key: KeyRef<'_>, out: &mut Vec<u8>) {
        put_str(out, &self.key);
        put_u64(out, self.recorded_at_ms);
    }

    fn read(_key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(Route {
            key: r.string()?,
            recorded_at_ms: r.u64()?,
        })
    }
}

impl Binary for StoredRoute {
    fn write(&self, key: KeyRef<'_>, out: &mut Vec<u8>) {
        self.route.write(key, out);
        put_u64(out, self.order);
    }

    fn read(key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(StoredRoute {
            route: Route::read(key, r)?,
            order: r.u64()?,
        })
    }
}

impl Binary for Decision {
    /// The id is left out when it is the record's key (a dedup entry's, always).
    fn write(&self, key: KeyRef<'_>, out: &mut Vec<u8>) {
        match key {
            KeyRef::Name(name) if name == self.id => put_bool(out, false),
            _ => {
                put_bool(out, true);
                put_str(out, &self.id);
            }
        }
        put_str(out, &self.key);
        put_u64(out, u64::from(self.partition));
        put_u64(out, self.seq);
        match &self.verdict {
            Verdict::Transition(state) => {
                out.push(0);
                state.write(key, out);
            }
            Verdict::Reject(reason) => {
                out.push(1);
                put_str(out, reason);
            }
        }
        put_version(out, &self.rule_version);
    }

    fn read(key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        let id = match (r.bool()?, key) {
            (true, _) => r.string()?,
            (false, KeyRef::Name(name)) => name.to_string(),
            (false, KeyRef::Seq(_)) => return Err("decision without an id".to_string()),
        };
        Ok(Decision {
            id,
            key: r.string()?,
            partition: r.u32()?,
            seq: r.u64()?,
            verdict: match r.u8()? {
                0 => Verdict::Transition(State::read(key, r)?),
                1 => Verdict::Reject(r.string()?),
                other => return Err(format!("bad verdict tag {other}")),
            },
            rule_version: r.version()?,
        })
    }
}

impl Binary for DedupEntry {
    /// The decision's id is left out when it is `key` (the request id the entry is kept under).
    fn write(&self, key: KeyRef<'_>, out: &mut Vec<u8>) {
        put_version(out, &self.fingerprint);
        self.decision.write(key, out);
    }

    fn read(key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(DedupEntry {
            fingerprint: r.version()?,
            decision: Decision::read(key, r)?,
        })
    }
}

impl Binary for StoredDedup {
    fn write(&self, key: KeyRef<'_>, out: &mut Vec<u8>) {
        self.entry.write(key, out);
        put_u64(out, self.order);
    }

    fn read(key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(StoredDedup {
            entry: DedupEntry::read(key, r)?,
            order: r.u64()?,
        })
    }
}

impl Binary for RoutedRequest {
    fn write(&self, _key: KeyRef<'_>, out: &mut Vec<u8>) {
        put_str(out, &self.id);
        put_bool(out, self.idempotent);
        put_str(out, &self.kind);
        put_str(out, &self.key);
        put_str(out, &self.user);
        put_str(out, &self.payload);
        put_u64(out, self.received_at_ms);
    }

    fn read(_key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(RoutedRequest {
            id: r.string()?,
            idempotent: r.bool()?,
            kind: r.string()?,
            key: r.string()?,
            user: r.string()?,
            payload: r.string()?,
            received_at_ms: r.u64()?,
        })
    }
}

impl Binary for Outcome {
    fn write(&self, _key: KeyRef<'_>, out: &mut Vec<u8>) {
        match self {
            Outcome::Transition { status, data } => {
                out.push(0);
                put_str(out, status);
                put_str(out, data);
            }
            Outcome::Reject { reason } => {
                out.push(1);
                put_str(out, reason);
            }
        }
    }

    fn read(_key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        match r.u8()? {
            0 => Ok(Outcome::Transition {
                status: r.string()?,
                data: r.string()?,
            }),
            1 => Ok(Outcome::Reject {
                reason: r.string()?,
            }),
            other => Err(format!("bad outcome tag {other}")),
        }
    }
}

impl Binary for LogEntry {
    /// The sequence number is the record's key: left out.
    fn write(&self, key: KeyRef<'_>, out: &mut Vec<u8>) {
        self.request.write(key, out);
        self.outcome.write(key, out);
        put_u64(out, self.state_version);
        put_version(out, &self.rule_version);
        put_u64(out, self.applied_at_ms);
    }

    fn read(key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(LogEntry {
            seq: key.seq(),
            request: RoutedRequest::read(key, r)?,
            outcome: Outcome::read(key, r)?,
            state_version: r.u64()?,
            rule_version: r.version()?,
            applied_at_ms: r.u64()?,
        })
    }
}

impl Binary for DeadLetter {
    /// The sequence number is the record's key: left out.
    fn write(&self, key: KeyRef<'_>, out: &mut Vec<u8>) {
        put_u64(out, u64::from(self.partition));
        self.request.write(key, out);
        put_str(out, &self.failure.kind);
        put_str(out, &self.failure.message);
        match &self.failure.detail {
            Some(detail) => {
                put_bool(out, true);
                put_str(out, detail);
            }
            None => put_bool(out, false),
        }
        put_version(out, &self.rule_version);
        put_u64(out, self.failed_at_ms);
        match &self.source {
            Some(source) => {
                put_bool(out, true);
                put_str(out, &source.topic);
                put_u64(out, u64::from(source.partition));
                // Offsets are never negative in a record that was read; the cast round-trips
                // whatever they are.
                put_u64(out, source.offset as u64);
            }
            None => put_bool(out, false),
        }
        match &self.resubmitted {
            Some(mark) => {
                put_bool(out, true);
                put_u64(out, mark.at_ms);
                put_str(out, &mark.outcome);
            }
            None => put_bool(out, false),
        }
    }

    fn read(key: KeyRef<'_>, r: &mut Reader<'_>) -> Result<Self, String> {
        Ok(DeadLetter {
            seq: key.seq(),
            partition: r.u32()?,
            request: RoutedRequest::read(key, r)?,
            failure: Failure {
                kind: r.string()?,
                message: r.string()?,
                detail: r.option(|r| r.string())?,
            },
            rule_version: r.version()?,
            failed_at_ms: r.u64()?,
            source: r.option(|r| {
                Ok(RecordSource {
                    topic: r.string()?,
                    partition: r.u32()?,
                    offset: r.u64()? as i64,
                })
            })?,
            resubmitted: r.option(|r| {
                Ok(Resubmitted {
                    at_ms: r.u64()?,
                    outcome: r.string()?,
                })
            })?,
        })
    }
}
