//! Test rule `misbehave`: behaves well (every request becomes a transition to `ok`) except for
//! the request kinds below, each of which breaks one sandbox limit on purpose. Expected: each bad
//! kind fails only its own request with the named error code, the key's state stays as it was,
//! and the next request on the same partition succeeds.
//!
//! | kind        | what it does                               | expected code          |
//! |-------------|--------------------------------------------|------------------------|
//! | `loop`      | spins forever                              | `rule_fuel_exhausted`, or `rule_deadline` when the fuel budget is huge |
//! | `alloc`     | allocates without end                      | `rule_memory`          |
//! | `panic`     | panics                                     | `rule_trap`            |
//! | `recurse`   | recurses until the stack overflows         | `rule_trap`            |
//! | `huge`      | returns a 1 MiB status string              | `rule_output`          |
//! | `bad-json`  | returns data that is not JSON              | `rule_output`          |
//! | `empty`     | returns an empty status                    | `rule_output`          |
//! | `chatty`    | logs 1000 lines, then behaves              | none (a transition)    |
//! | `spin`      | counts to the number in its payload, then behaves | none, unless that takes longer than the deadline |

use turnstile_rule::{Level, Outcome, Request, Rule, State, export_rule, log};

struct Misbehave;

impl Rule for Misbehave {
    fn handle(current: Option<State>, request: Request) -> Outcome {
        match request.kind.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Reserve without writing, so memory grows long before fuel runs out.
                    hoard.push(Vec::with_capacity(1 << 20));
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("the rule panicked on purpose"),
            "out-of-bounds" => {
                // An address far past the 16 MiB memory cap: trapped by a bounds check (or a
                // guard page with `rule.spectre_hardening`), never a read of host memory.
                let far = std::hint::black_box(usize::MAX - 15) as *const u8;
                #[allow(unsafe_code)] // a hostile rule is what this guest is for
                let byte = unsafe { core::ptr::read_volatile(far) };
                Outcome::transition("ok", format!("{byte}"))
            }
            "recurse" => Outcome::transition("ok", format!("{}", recurse(std::hint::black_box(1)))),
            "huge" => Outcome::transition("x".repeat(1 << 20), "{}"),
            "bad-json" => Outcome::transition("ok", "{not json"),
            "empty" => Outcome::transition("", "{}"),
            "spin" => {
                let rounds: u64 = request.payload.trim().parse().unwrap_or(0);
                let mut n: u64 = 0;
                for _ in 0..rounds {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
                Outcome::transition("ok", format!("{{\"counted\":{n}}}"))
            }
            "chatty" => {
                for i in 0..1000 {
                    log(Level::Info, &format!("chatty line {i}"));
                }
                Outcome::transition("ok", "{}")
            }
            _ => {
                let version = current.map_or(0, |s| s.version);
                Outcome::transition("ok", format!("{{\"seen_version\":{version}}}"))
            }
        }
    }
}

#[inline(never)]
#[allow(unconditional_recursion, reason = "overflowing the stack is the point")]
fn recurse(n: u64) -> u64 {
    let buffer = std::hint::black_box([n; 64]);
    recurse(buffer[(n % 64) as usize] + 1) + buffer[0]
}

export_rule!(Misbehave);
