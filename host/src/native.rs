//! The reference rule compiled natively into the host, for benchmarks: the same source file as
//! the Wasm reference rule (`guest/rules/reservation/src/decide.rs`), so the comparison measures
//! the sandbox and nothing else.

use crate::model::{Outcome, RoutedRequest, State};
use crate::sandbox::RuleFailure;

#[path = "../../guest/rules/reservation/src/decide.rs"]
#[allow(
    dead_code,
    reason = "the rule file also exports items only the guest uses"
)]
mod reference;

/// A rule as a native function.
#[derive(Clone, Copy)]
pub struct NativeRule {
    /// Shown where a Wasm rule shows its version id.
    pub version: &'static str,
    /// The decision.
    pub decide: fn(Option<&State>, &RoutedRequest) -> Result<Outcome, RuleFailure>,
}

impl std::fmt::Debug for NativeRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.version)
    }
}

/// The reference rule, natively. Its inputs are copied into the SDK's types as the Wasm call
/// copies them into guest memory, so both do the same data movement.
pub const REFERENCE: NativeRule = NativeRule {
    version: "native-reference",
    decide: reference_decide,
};

fn reference_decide(
    current: Option<&State>,
    request: &RoutedRequest,
) -> Result<Outcome, RuleFailure> {
    let current = current.map(|s| turnstile_rule::State {
        status: s.status.clone(),
        user: s.user.clone(),
        data: s.data.clone(),
        version: s.version,
    });
    let request = turnstile_rule::Request {
        id: request.id.clone(),
        kind: request.kind.clone(),
        key: request.key.clone(),
        user: request.user.clone(),
        payload: request.payload.clone(),
        received_at_ms: request.received_at_ms,
    };
    Ok(match reference::decide(current.as_ref(), &request) {
        turnstile_rule::Outcome::Transition(t) => Outcome::Transition {
            status: t.status,
            data: t.data,
        },
        turnstile_rule::Outcome::Reject(reason) => Outcome::Reject { reason },
    })
}
