// A determinism test rule in JavaScript: every call reads the clocks, draws random numbers from
// Math.random and crypto, prints to stdout and stderr, and logs, and puts what it saw into the
// transition's data. Under Turnstile's deterministic WASI the same request gives the same data,
// on replay too. A request of kind "throw" throws an uncaught exception after printing, whose
// message the failure must carry.
import log from "log";

export function handle(current, request) {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  const seen = {
    date_now_ms: Date.now(),
    performance_now: performance.now(),
    math_random: Math.random(),
    crypto_bytes: Array.from(bytes),
    previous: current === undefined ? null : current.data,
  };
  console.log(`det-js ${request.id}: now=${seen.date_now_ms} random=${seen.math_random}`);
  console.error(`det-js ${request.id}: to stderr`);
  log("info", `det-js ${request.id}: logged`);
  if (request.kind === "throw") {
    throw new Error(`refused ${request.key}`);
  }
  return { tag: "transition", val: { status: "drawn", data: JSON.stringify(seen) } };
}
