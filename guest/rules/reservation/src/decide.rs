//! The reference rule's decisions as plain functions, so that other code (a test rule that
//! changes one policy, native benchmarks) can include exactly the same logic.

use turnstile_rule::{Outcome, Request, State};

/// Status of a key after a successful `reserve`.
pub const RESERVED: &str = "reserved";
/// Status of a key after a successful `associate`.
pub const ASSOCIATED: &str = "associated";

/// The rule's decision as a plain function, so native code (tests, the benchmark's native
/// baseline) can run exactly the same logic without Wasm.
pub fn decide(current: Option<&State>, request: &Request) -> Outcome {
    match request.kind.as_str() {
        "reserve" => match current {
            None => Outcome::transition(
                RESERVED,
                format!("{{\"reserved_at_ms\":{}}}", request.received_at_ms),
            ),
            Some(state) => Outcome::reject(format!("key is already {}", state.status)),
        },
        "associate" => match current {
            None => Outcome::reject("key has no reservation"),
            Some(state) if state.status == ASSOCIATED => {
                Outcome::reject("key is already associated")
            }
            Some(state) if state.status != RESERVED => {
                Outcome::reject(format!("key is {}, not reserved", state.status))
            }
            Some(state) if state.user != request.user => {
                Outcome::reject("key is reserved by another user")
            }
            Some(state) => Outcome::transition(
                ASSOCIATED,
                with_field(&state.data, "associated_at_ms", request.received_at_ms),
            ),
        },
        other => Outcome::reject(format!("unknown kind: {other}")),
    }
}

/// Adds `"name":value` to a JSON object this rule wrote itself (always a non-empty object ending
/// in `}`), so the rule needs no JSON library and stays small and fast.
fn with_field(object: &str, name: &str, value: u64) -> String {
    let body = object.trim_end().trim_end_matches('}');
    if body.trim() == "{" {
        format!("{{\"{name}\":{value}}}")
    } else {
        format!("{body},\"{name}\":{value}}}")
    }
}
