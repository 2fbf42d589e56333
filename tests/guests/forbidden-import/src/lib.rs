//! Test guest `forbidden-import`: a rule that imports `now`, which the world does not offer.
//! Expected: refused at load with `forbidden import` naming `now`; never instantiated.

#![allow(
    unsafe_code,
    reason = "wit-bindgen's generated exports use `export_name`"
)]

wit_bindgen::generate!({
    world: "test:forbidden/rule-with-clock",
    path: ["../../../wit", "wit"],
    generate_all,
});

use turnstile::rule::types::Transition;

struct WithClock;

impl Guest for WithClock {
    fn handle(_current: Option<State>, _request: Request) -> Outcome {
        Outcome::Transition(Transition {
            status: "ok".into(),
            data: format!("{{\"now\":{}}}", now()),
        })
    }
}

export!(WithClock);
