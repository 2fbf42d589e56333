"""The reference rule in Python: the state machine of patent CN 115391365 A, deciding exactly as
guest/rules/reservation (Rust) does, so guest/rules/reservation/scenarios.toml passes unchanged.

    (none) --reserve--> reserved --associate (same user)--> associated

`data` records when each step happened, using the host-given request time, so the rule stays
deterministic. The `wit_world` bindings are generated from wit/rule.wit at build time.
"""

import json
from typing import Optional

import wit_world
from wit_world.imports.types import Outcome, Outcome_Reject, Outcome_Transition, Request, State, Transition

RESERVED = "reserved"
ASSOCIATED = "associated"


def transition(status: str, data: dict) -> Outcome:
    # Compact separators: the same bytes as the Rust and JavaScript rules write.
    return Outcome_Transition(Transition(status=status, data=json.dumps(data, separators=(",", ":"))))


def reject(reason: str) -> Outcome:
    return Outcome_Reject(reason)


class WitWorld(wit_world.WitWorld):
    def handle(self, current: Optional[State], request: Request) -> Outcome:
        at = request.received_at_ms
        if request.kind == "reserve":
            if current is None:
                return transition(RESERVED, {"reserved_at_ms": at})
            return reject(f"key is already {current.status}")
        if request.kind == "associate":
            if current is None:
                return reject("key has no reservation")
            if current.status == ASSOCIATED:
                return reject("key is already associated")
            if current.status != RESERVED:
                return reject(f"key is {current.status}, not reserved")
            if current.user != request.user:
                return reject("key is reserved by another user")
            return transition(ASSOCIATED, {**json.loads(current.data), "associated_at_ms": at})
        return reject(f"unknown kind: {request.kind}")
