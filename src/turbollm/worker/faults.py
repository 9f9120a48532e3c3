"""Faults injected on purpose, for the reliability tests (docs/reliability.md).

TURBOLLM_INJECT_FAULT="K" makes the K-th model forward of the worker raise InjectedFault (once,
counting from 1); "K+" makes every forward from the K-th on raise (a persistent failure, such as
broken weights or a lost device). Read when the worker builds its model runner, so a server
started as a child process takes it from its environment. Unset, nothing is checked.
"""
from __future__ import annotations

import os
import re

ENV = "TURBOLLM_INJECT_FAULT"


class InjectedFault(RuntimeError):
    pass


class FaultPlan:
    def __init__(self, first: int, persistent: bool):
        self.first, self.persistent = first, persistent
        self.forwards = 0

    def before_forward(self) -> None:
        self.forwards += 1
        n = self.forwards
        if n == self.first or (self.persistent and n > self.first):
            raise InjectedFault(f"injected fault in model forward #{n} ({ENV})")


def fault_plan_from_env() -> FaultPlan | None:
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    m = re.fullmatch(r"([1-9][0-9]*)(\+?)", spec)
    if m is None:
        raise ValueError(f"{ENV} must be K (fail the K-th model forward) or K+ (every one from "
                         f"the K-th on), got {spec!r}")
    return FaultPlan(int(m.group(1)), m.group(2) == "+")
