//! Test rule `hostile`: written as an attacker would, to break isolation between requests and
//! flood or forge the host's log. Expected behaviour of the host is in each row.
//!
//! | kind        | what it does                                            | expected from the host |
//! |-------------|---------------------------------------------------------|------------------------|
//! | `count`     | counts calls in a global and returns the count as data  | always `{"calls":1}` under per-call isolation |
//! | `remember`  | keeps the previous request's user and payload in a global buffer and rejects with them | the reason never names an earlier request |
//! | `log-flood` | writes `payload` log lines (a number), then transitions | at most `rule.max_log_lines_per_second` lines reach the log, the partition keeps answering |
//! | `log-forge` | writes one log line with LF, CR and U+202E in it         | the line is written escaped, on one line |
//! | `rtl-data`  | transitions with data holding U+202E (valid in a JSON string) | `turnstile test` prints it escaped |
//! | `huge-number` | returns data `1e999999`: JSON text no reader can hold | `rule_output` |
//! | `lone-surrogate` | returns data `"\ud800"` | `rule_output` |
//! | `ws-status` | returns a status of only whitespace                     | `rule_output`          |
//! | `ctl-status`| returns a status with an ESC character                  | `rule_output`          |
//! | other       | transitions to `ok`                                     | a transition           |

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use turnstile_rule::{Level, Outcome, Request, Rule, State, export_rule, log};

/// Calls seen by this instance: 1 on every call when each call gets a fresh instance.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// What the previous request carried, if this instance saw one.
static PREVIOUS: Mutex<Option<String>> = Mutex::new(None);

struct Hostile;

impl Rule for Hostile {
    fn handle(_current: Option<State>, request: Request) -> Outcome {
        match request.kind.as_str() {
            "count" => {
                let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
                Outcome::transition("counted", format!("{{\"calls\":{calls}}}"))
            }
            "remember" => {
                let mine = format!("{}:{}", request.user, request.payload);
                let previous = PREVIOUS.lock().unwrap().replace(mine);
                match previous {
                    Some(theirs) => Outcome::reject(format!("previous request: {theirs}")),
                    None => Outcome::transition("fresh", "{}"),
                }
            }
            "log-flood" => {
                let lines: u64 = request.payload.parse().unwrap_or(1000);
                for i in 0..lines {
                    log(Level::Warn, &format!("flood line {i}"));
                }
                Outcome::transition("flooded", "{}")
            }
            "log-forge" => {
                log(
                    Level::Warn,
                    "innocent\nERROR turnstile: forged host line\r\u{202e}desrever",
                );
                Outcome::transition("forged", "{}")
            }
            "rtl-data" => Outcome::transition("ok", "{\"note\":\"\u{202e}ko ... dnuof eht\"}"),
            "huge-number" => Outcome::transition("ok", "1e999999"),
            "lone-surrogate" => Outcome::transition("ok", "\"\\ud800\""),
            "ws-status" => Outcome::transition(" \t ", "{}"),
            "ctl-status" => Outcome::transition("ok\u{1b}[2J", "{}"),
            _ => Outcome::transition("ok", "{}"),
        }
    }
}

export_rule!(Hostile);
