// The reference rule in JavaScript: the state machine of patent CN 115391365 A, deciding exactly
// as guest/rules/reservation (Rust) does, so guest/rules/reservation/scenarios.toml passes unchanged.
//
//   (none) --reserve--> reserved --associate (same user)--> associated
//
// `data` records when each step happened, using the host-given request time (a BigInt: WIT u64),
// so the rule stays deterministic.

const RESERVED = "reserved";
const ASSOCIATED = "associated";

const transition = (status, data) => ({ tag: "transition", val: { status, data: JSON.stringify(data) } });
const reject = (reason) => ({ tag: "reject", val: reason });

/**
 * @param {import("../../js/types/rule").State | undefined} current
 * @param {import("../../js/types/rule").Request} request
 * @returns {import("../../js/types/rule").Outcome}
 */
export function handle(current, request) {
  // JSON numbers: request times fit in 2^53 for the next 280 000 years.
  const at = Number(request.receivedAtMs);
  switch (request.kind) {
    case "reserve":
      if (current === undefined) return transition(RESERVED, { reserved_at_ms: at });
      return reject(`key is already ${current.status}`);
    case "associate":
      if (current === undefined) return reject("key has no reservation");
      if (current.status === ASSOCIATED) return reject("key is already associated");
      if (current.status !== RESERVED) return reject(`key is ${current.status}, not reserved`);
      if (current.user !== request.user) return reject("key is reserved by another user");
      return transition(ASSOCIATED, { ...JSON.parse(current.data), associated_at_ms: at });
    default:
      return reject(`unknown kind: ${request.kind}`);
  }
}
