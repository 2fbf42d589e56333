//! # turnstile-rule: the SDK for Turnstile transition rules
//!
//! A rule is a pure function from a key's current [`State`] and one [`Request`] to an
//! [`Outcome`]. Write a type that implements [`Rule`], hand it to [`export_rule!`], and build the
//! crate with `turnstile build` (or see the README for the plain cargo command):
//!
//! ```ignore
//! use turnstile_rule::{export_rule, Outcome, Request, Rule, State};
//!
//! struct Doorman;
//!
//! impl Rule for Doorman {
//!     fn handle(current: Option<State>, request: Request) -> Outcome {
//!         match (current, request.kind.as_str()) {
//!             (None, "enter") => Outcome::transition("inside", "{}"),
//!             (Some(_), "enter") => Outcome::reject("already inside"),
//!             _ => Outcome::reject("unknown kind"),
//!         }
//!     }
//! }
//!
//! export_rule!(Doorman);
//! ```
//!
//! The contract is `wit/rule.wit` in the Turnstile repository. Rules get no clock, randomness,
//! filesystem or network: everything a decision may depend on arrives in its arguments, which is
//! what lets the host replay a log of requests through a new rule and get the same answers.
#![deny(missing_docs)]

/// Bindings generated from `wit/rule.wit`. Rule authors use the re-exports at the crate root;
/// this module is public because the generated [`export_rule!`] macro refers to it by path.
#[doc(hidden)]
pub mod bindings {
    #![allow(missing_docs)]
    wit_bindgen::generate!({
        world: "rule",
        path: "../wit",
        pub_export_macro: true,
        // The public `export_rule!` wraps this one to route panic messages to the host.
        export_macro_name: "export_raw",
        default_bindings_module: "turnstile_rule::bindings",
    });
}

pub use bindings::turnstile::rule::types::{Level, Outcome, Request, State, Transition};

/// The trait a rule implements: one function, `handle`, called once per request on the thread of
/// the partition that owns the request's key.
pub use bindings::Guest as Rule;

/// Exports a type implementing [`Rule`] as the component's `handle` function. Use it once per
/// rule crate, at the crate root: `export_rule!(MyRule);`.
///
/// A panic in the rule still fails the request (`rule_trap`), but its message and source location
/// reach the host first, so the failure, the dead letter and `turnstile test` say why.
#[macro_export]
macro_rules! export_rule {
    ($rule:ty) => {
        const _: () = {
            struct TurnstileExport;
            impl $crate::Rule for TurnstileExport {
                fn handle(
                    current: ::core::option::Option<$crate::State>,
                    request: $crate::Request,
                ) -> $crate::Outcome {
                    $crate::route_panics_to_host();
                    <$rule as $crate::Rule>::handle(current, request)
                }
            }
    $crate::bindings::export_raw!(TurnstileExport with_types_in $crate::bindings);
        };
    };
}

/// Longest panic message sent to the host; the host bounds log lines anyway, this keeps a huge
/// payload from being formatted in full inside the guest.
const MAX_PANIC_MESSAGE: usize = 512;

/// Installs (once per instance) the panic hook that sends a panic's location and message to the
/// host as an error log line starting with `panicked at`, which the host attaches to the trap.
/// Called by [`export_rule!`]; rules need not call it.
#[doc(hidden)]
pub fn route_panics_to_host() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("Box<dyn Any>");
            let mut end = message.len().min(MAX_PANIC_MESSAGE);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            let location = info.location().map_or_else(String::new, |l| {
                format!(" {}:{}:{}", l.file(), l.line(), l.column())
            });
            bindings::log(
                Level::Error,
                &format!("panicked at{location}: {}", &message[..end]),
            );
        }));
    });
}

/// Writes one line to the host's log, tagged by the host with the partition and rule version.
pub fn log(level: Level, message: &str) {
    bindings::log(level, message)
}

impl Outcome {
    /// A decision to move the key to `status` with `data` (JSON text, e.g. `"{}"`).
    pub fn transition(status: impl Into<String>, data: impl Into<String>) -> Self {
        Outcome::Transition(Transition {
            status: status.into(),
            data: data.into(),
        })
    }

    /// A decision to refuse the request; `reason` is returned to the client as is.
    pub fn reject(reason: impl Into<String>) -> Self {
        Outcome::Reject(reason.into())
    }
}
