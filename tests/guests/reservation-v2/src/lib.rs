//! Test rule `reservation-v2`: the reference rule with one policy changed: the user who holds a
//! reservation may `reserve` their own key again, which refreshes it (a transition to `reserved`
//! with the new time) instead of being rejected. Every other decision is the reference's own code.
//! Expected: `turnstile replay` of a log made by the reference rule reports exactly the
//! same-user re-reserves of reserved keys as differences (reject → transition:reserved).

use turnstile_rule::{Outcome, Request, Rule, State, export_rule};

#[path = "../../../../guest/rules/reservation/src/decide.rs"]
mod reference;

struct ReservationV2;

impl Rule for ReservationV2 {
    fn handle(current: Option<State>, request: Request) -> Outcome {
        match &current {
            Some(state)
                if request.kind == "reserve"
                    && state.status == reference::RESERVED
                    && state.user == request.user =>
            {
                Outcome::transition(
                    reference::RESERVED,
                    format!("{{\"reserved_at_ms\":{}}}", request.received_at_ms),
                )
            }
            _ => reference::decide(current.as_ref(), &request),
        }
    }
}

export_rule!(ReservationV2);
