//! The reference rule: the state machine of patent CN 115391365 A.
//!
//! ```text
//!   (none) --reserve--> reserved --associate (same user)--> associated
//! ```
//!
//! Everything else is a reject whose reason says why. `data` records when each step happened,
//! using the host-given request time, so the rule stays deterministic.

use turnstile_rule::{Outcome, Request, Rule, State, export_rule};

mod decide;

pub use decide::{ASSOCIATED, RESERVED, decide};

/// The reference reservation rule.
pub struct Reservation;

impl Rule for Reservation {
    fn handle(current: Option<State>, request: Request) -> Outcome {
        decide(current.as_ref(), &request)
    }
}

export_rule!(Reservation);
