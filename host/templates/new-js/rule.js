// A Turnstile rule in JavaScript: a door that a user enters and leaves. Replace it with your own
// state machine; `scenarios.toml` says what it must do, `turnstile test` checks it.
//
// `handle(current, request)` gets the key's state (`undefined` before its first transition) and
// the request, and returns `{ tag: "transition", val: { status, data } }` (data is JSON text) or
// `{ tag: "reject", val: reason }`. WIT u64 fields (`request.receivedAtMs`, `current.version`)
// are BigInts. Types: sdk/types/rule.d.ts, generated from wit/rule.wit.
import log from "log";

/**
 * @param {import("./sdk/types/rule").State | undefined} current
 * @param {import("./sdk/types/rule").Request} request
 * @returns {import("./sdk/types/rule").Outcome}
 */
export function handle(current, request) {
  const status = current?.status;
  if (request.kind === "enter" && (status === undefined || status === "outside")) {
    return { tag: "transition", val: { status: "inside", data: "{}" } };
  }
  if (request.kind === "enter" && status === "inside") return { tag: "reject", val: "already inside" };
  if (request.kind === "leave" && status === "inside") {
    return { tag: "transition", val: { status: "outside", data: "{}" } };
  }
  log("debug", `${request.kind} is not possible in ${status}`);
  return { tag: "reject", val: "not possible now" };
}
