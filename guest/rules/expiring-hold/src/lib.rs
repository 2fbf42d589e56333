//! Example rule: holds that expire.
//!
//! A user `hold`s a key for `ttl_ms` (from the payload, default 10 minutes), then `confirm`s it
//! before the hold expires, or `release`s it. An expired hold can be taken by anyone. Time comes
//! only from the request (`received_at_ms`), so the rule stays deterministic and replayable.
//!
//! ```text
//!   (none | released | expired) --hold--> held --confirm (holder, in time)--> confirmed
//!                                          held --release (holder)--------> released
//! ```
//!
//! The state's data carries who holds the key, until when, and how many holds it has seen.

use serde::{Deserialize, Serialize};
use turnstile_rule::{Outcome, Request, Rule, State, export_rule};

/// How long a hold lasts when the payload does not say.
const DEFAULT_TTL_MS: u64 = 10 * 60 * 1000;

/// The rule.
struct ExpiringHold;

/// What this rule keeps in a key's data.
#[derive(Serialize, Deserialize, Default)]
struct Hold {
    holder: String,
    expires_at_ms: u64,
    holds: u64,
}

/// The payload of `hold`.
#[derive(Deserialize, Default)]
struct HoldPayload {
    ttl_ms: Option<u64>,
}

impl Rule for ExpiringHold {
    fn handle(current: Option<State>, request: Request) -> Outcome {
        let now = request.received_at_ms;
        let hold: Option<Hold> = current
            .as_ref()
            .and_then(|s| serde_json::from_str(&s.data).ok());
        let status = current.as_ref().map(|s| s.status.as_str());
        let active = status == Some("held") && hold.as_ref().is_some_and(|h| now < h.expires_at_ms);
        let mine = hold.as_ref().is_some_and(|h| h.holder == request.user);

        match request.kind.as_str() {
            "hold" => {
                if status == Some("confirmed") {
                    return Outcome::reject("key is already confirmed");
                }
                if active {
                    let until = hold.as_ref().map_or(0, |h| h.expires_at_ms);
                    return Outcome::reject(if mine {
                        format!("you already hold this key until {until}")
                    } else {
                        format!("key is held by another user until {until}")
                    });
                }
                let ttl = serde_json::from_str::<HoldPayload>(&request.payload)
                    .ok()
                    .and_then(|p| p.ttl_ms)
                    .unwrap_or(DEFAULT_TTL_MS);
                let next = Hold {
                    holder: request.user,
                    expires_at_ms: now.saturating_add(ttl),
                    holds: hold.map_or(0, |h| h.holds) + 1,
                };
                Outcome::transition("held", to_json(&next))
            }
            "confirm" => match (status, hold) {
                (Some("held"), Some(h)) if h.holder != request.user => {
                    Outcome::reject("key is held by another user")
                }
                (Some("held"), Some(h)) if now >= h.expires_at_ms => {
                    Outcome::reject(format!("hold expired at {}", h.expires_at_ms))
                }
                (Some("held"), Some(h)) => Outcome::transition("confirmed", to_json(&h)),
                (Some("confirmed"), _) => Outcome::reject("key is already confirmed"),
                _ => Outcome::reject("nothing is held on this key"),
            },
            "release" => match (status, hold) {
                (Some("held"), Some(h)) if h.holder == request.user => {
                    Outcome::transition("released", to_json(&h))
                }
                (Some("held"), _) => Outcome::reject("only the holder can release"),
                _ => Outcome::reject("nothing is held on this key"),
            },
            other => Outcome::reject(format!("unknown kind: {other}")),
        }
    }
}

fn to_json(hold: &Hold) -> String {
    serde_json::to_string(hold).unwrap_or_else(|_| "{}".into())
}

export_rule!(ExpiringHold);
