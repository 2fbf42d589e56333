//! Test rule `echo`: accepts every request and moves the key to a status named after the
//! request's kind, with the payload as data. Expected: with `--rule` it replaces the reference
//! rule's decisions (e.g. a second `reserve` on a key succeeds), proving the rule really runs.

use turnstile_rule::{Outcome, Request, Rule, State, export_rule};

struct Echo;

impl Rule for Echo {
    fn handle(_current: Option<State>, request: Request) -> Outcome {
        Outcome::transition(format!("echo-{}", request.kind), request.payload)
    }
}

export_rule!(Echo);
