"""The fault-injection plan the reliability tests arm through TURBOLLM_INJECT_FAULT."""
import pytest

from turbollm.worker.faults import ENV, FaultPlan, InjectedFault, fault_plan_from_env


def _fires(plan: FaultPlan, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        try:
            plan.before_forward()
            out.append(False)
        except InjectedFault:
            out.append(True)
    return out


def test_once_and_persistent(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert fault_plan_from_env() is None
    monkeypatch.setenv(ENV, "3")
    assert _fires(fault_plan_from_env(), 6) == [False, False, True, False, False, False]
    monkeypatch.setenv(ENV, "2+")
    assert _fires(fault_plan_from_env(), 4) == [False, True, True, True]


@pytest.mark.parametrize("bad", ["0", "-1", "x", "3++", "1.5"])
def test_a_malformed_plan_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv(ENV, bad)
    with pytest.raises(ValueError, match=ENV):
        fault_plan_from_env()
