//! The values that flow through the runtime: a client's request, the routed request a rule sees,
//! a key's state, a rule's outcome, and the decision returned to the client.
//!
//! These are the host's own types; `sandbox` converts them to and from the WIT types at the
//! boundary, so nothing outside `sandbox` depends on generated bindings.

use serde::{Deserialize, Serialize};

/// A request as a client submits it (already checked for shape by the caller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Idempotency id: a retry with the same id returns the first answer and changes nothing.
    pub id: Option<String>,
    /// What is asked, e.g. `reserve`.
    pub kind: String,
    /// The routing key; when absent the route cache supplies the user's key.
    pub key: Option<String>,
    /// The user's identity.
    pub user: String,
    /// JSON text of the payload, if any.
    pub payload: Option<String>,
}

/// A request after routing: what the partition thread applies, the rule sees, and the log keeps.
/// Unknown fields are refused: a Kafka record carrying one is not what it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedRequest {
    /// The client's id, or one the host generated.
    pub id: String,
    /// Whether `id` came from the client, so the partition remembers it for deduplication.
    pub idempotent: bool,
    /// What is asked.
    pub kind: String,
    /// The key, given or resolved through the route cache.
    pub key: String,
    /// The user's identity.
    pub user: String,
    /// JSON text of the payload (`null` when none).
    pub payload: String,
    /// Host time when the request was received, ms since the Unix epoch.
    pub received_at_ms: u64,
}

/// The stored state of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Current status, never empty.
    pub status: String,
    /// The user whose request created the state.
    pub user: String,
    /// The rule's data, as JSON text (checked valid before it was stored).
    pub data: String,
    /// Number of transitions so far; the first makes 1.
    pub version: u64,
    /// Version id (sha256 of the component bytes) of the rule that made this state.
    pub rule_version: String,
    /// Host time of the transition that made this state, ms since the Unix epoch.
    pub updated_at_ms: u64,
}

/// What a rule decided, after the host validated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Move to `status` with `data` (JSON text).
    Transition {
        /// The new status.
        status: String,
        /// The new data.
        data: String,
    },
    /// Refuse, for `reason`.
    Reject {
        /// Why, for the client.
        reason: String,
    },
}

/// The answer to one applied request: what the client gets, and what deduplication replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The request's id.
    pub id: String,
    /// The key the request was applied to.
    pub key: String,
    /// The partition that applied it.
    pub partition: u32,
    /// Its position in the partition's log of applied requests.
    pub seq: u64,
    /// What happened.
    pub verdict: Verdict,
    /// Version id of the rule that decided, for rejects as for transitions (empty in answers
    /// stored before it was recorded).
    #[serde(default)]
    pub rule_version: String,
}

/// A transition with the state it made, or a reject with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The key moved to this state.
    Transition(State),
    /// The key did not change.
    Reject(String),
}

/// Milliseconds since the Unix epoch, the host's only clock for rules and routes.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
