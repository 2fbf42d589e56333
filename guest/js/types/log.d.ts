// The world's `log` import, as componentize-js provides it to a rule (`import log from "log"`).
// Written by hand: `jco types` describes only the world's interfaces and exports.
declare module "log" {
  /** Writes one line to the host's log; the host may shorten long messages. */
  export default function log(level: import("./interfaces/turnstile-rule-types.js").Level, message: string): void;
}
