"""A determinism test rule in Python: every call reads the clocks, draws random numbers from
`random`, `os.urandom` and `secrets`, prints to stdout and stderr, and logs, and puts what it saw
into the transition's data. Under Turnstile's deterministic WASI the same request gives the same
data, on replay too. A request of kind "throw" raises an uncaught exception after printing, whose
message the failure must carry.
"""

import json
import os
import random
import secrets
import sys
import time
from typing import Optional

import wit_world
from wit_world.imports.types import Level, Outcome, Outcome_Transition, Request, State, Transition


class WitWorld(wit_world.WitWorld):
    def handle(self, current: Optional[State], request: Request) -> Outcome:
        seen = {
            "time_ns": time.time_ns(),
            "monotonic_ns": time.monotonic_ns(),
            "random": random.random(),
            "urandom": list(os.urandom(8)),
            "secrets": secrets.token_hex(8),
            "previous": None if current is None else current.data,
        }
        print(f"det-py {request.id}: time_ns={seen['time_ns']} random={seen['random']}")
        print(f"det-py {request.id}: to stderr", file=sys.stderr)
        wit_world.log(Level.INFO, f"det-py {request.id}: logged")
        if request.kind == "throw":
            raise ValueError(f"refused {request.key}")
        return Outcome_Transition(Transition(status="drawn", data=json.dumps(seen, separators=(",", ":"))))
