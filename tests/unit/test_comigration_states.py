"""The co-migration protocol object without any I/O: step order, the guest's commit point,
which recovery a failure calls for, terminal states, timings (fake clock)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmore_nova.rm_vm.comigration import (
    STEPS,
    TERMINAL,
    CoMigrationProtocol,
    ProtocolViolation,
    Recovery,
    State,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def tick(self, dt: float) -> None:
        self.t += dt


def run_steps(p: CoMigrationProtocol, clock: Clock, n: int, *, commit: bool = True) -> None:
    for state in STEPS[:n]:
        p.begin(state)
        clock.tick(0.5)
        if state is State.GUEST_SWITCHOVER and commit:
            p.commit_guest()
        p.end(step=state.value)


def test_steps_in_order_with_timings():
    clock = Clock()
    p = CoMigrationProtocol(clock)
    assert p.state is State.IDLE and p.completed == []
    for i, state in enumerate(STEPS):
        rec = p.begin(state)
        assert p.state is state and p.in_progress is state and rec.started == clock.t
        clock.tick(i + 1)
        if state is State.GUEST_SWITCHOVER:
            p.commit_guest()
        p.end(n=i)
    p.finish(State.DONE)
    assert p.outcome is p.state is State.DONE
    assert p.timings() == {s.value: float(i + 1) for i, s in enumerate(STEPS)}
    assert p.total == sum(range(1, len(STEPS) + 1))
    assert [r.notes for r in p.history] == [{"n": i} for i in range(len(STEPS))]


@pytest.mark.parametrize("skip_to", range(1, len(STEPS)))
def test_steps_cannot_be_skipped(skip_to):
    p = CoMigrationProtocol(Clock())
    with pytest.raises(ProtocolViolation, match="out of order"):
        p.begin(STEPS[skip_to])
    assert p.state is State.IDLE and p.history == []


def test_no_step_twice_or_overlapping():
    p = CoMigrationProtocol(Clock())
    p.begin(State.PREPARE)
    with pytest.raises(ProtocolViolation, match="runs"):
        p.begin(State.GUEST_SWITCHOVER)
    p.end()
    with pytest.raises(ProtocolViolation, match="out of order"):
        p.begin(State.PREPARE)
    with pytest.raises(ProtocolViolation, match="no step"):
        p.end()


@pytest.mark.parametrize("state", [s for s in STEPS if s is not State.GUEST_SWITCHOVER])
def test_commit_only_during_guest_switchover(state):
    clock = Clock()
    p = CoMigrationProtocol(clock)
    run_steps(p, clock, STEPS.index(state))
    p.begin(state)
    with pytest.raises(ProtocolViolation, match="switchover"):
        p.commit_guest()
    assert p.guest_committed is (STEPS.index(state) > STEPS.index(State.GUEST_SWITCHOVER))


def test_guest_switchover_cannot_end_without_commit():
    """The RM may only follow a guest that actually moved."""
    clock = Clock()
    p = CoMigrationProtocol(clock)
    run_steps(p, clock, 1)
    p.begin(State.GUEST_SWITCHOVER)
    with pytest.raises(ProtocolViolation, match="committed"):
        p.end()
    p.commit_guest()
    p.end()
    p.begin(State.RM_REHOME)


@pytest.mark.parametrize("failed_in", range(len(STEPS)))
def test_failure_before_commit_rolls_back_after_restarts(failed_in):
    clock = Clock()
    p = CoMigrationProtocol(clock)
    run_steps(p, clock, failed_in)
    state = STEPS[failed_in]
    p.begin(state)
    clock.tick(0.25)
    committed = failed_in > STEPS.index(State.GUEST_SWITCHOVER)
    recovery = p.fail(RuntimeError("boom"))
    assert recovery is (Recovery.RESTART_AT_DESTINATION if committed else Recovery.ROLLBACK)
    assert p.recovery is recovery and p.error == "boom"
    rec = p.history[-1]
    assert rec.state is state and rec.error == "boom" and rec.seconds == 0.25
    assert p.completed == list(STEPS[:failed_in])
    with pytest.raises(ProtocolViolation):
        p.begin(STEPS[failed_in])  # no step after a failure
    with pytest.raises(ProtocolViolation):
        p.finish(State.DONE)
    wrong = State.ROLLED_BACK if committed else State.RESTARTED
    with pytest.raises(ProtocolViolation):
        p.finish(wrong)
    p.finish(State.RESTARTED if committed else State.ROLLED_BACK)
    with pytest.raises(ProtocolViolation, match="already finished"):
        p.fail("again")


def test_failure_inside_switchover_after_commit_restarts():
    """The guest resumed at the destination and then something failed within the same step:
    the guest stays there."""
    clock = Clock()
    p = CoMigrationProtocol(clock)
    run_steps(p, clock, 1)
    p.begin(State.GUEST_SWITCHOVER)
    p.commit_guest()
    assert p.fail("release failed") is Recovery.RESTART_AT_DESTINATION


def test_failed_recovery_finishes_as_failed():
    p = CoMigrationProtocol(Clock())
    p.begin(State.PREPARE)
    p.fail(ValueError())
    assert p.error == "ValueError"  # an empty message still says what happened
    p.finish(State.FAILED)
    assert p.state is State.FAILED


def test_finish_needs_a_terminal_state_and_no_running_step():
    p = CoMigrationProtocol(Clock())
    with pytest.raises(ProtocolViolation, match="terminal"):
        p.finish(State.REPLAY)
    with pytest.raises(ProtocolViolation):
        p.finish(State.DONE)  # nothing done yet
    with pytest.raises(ProtocolViolation):
        p.finish(State.FAILED)  # nothing failed
    p.begin(State.PREPARE)
    with pytest.raises(ProtocolViolation, match="still runs"):
        p.finish(State.DONE)


OPS = st.lists(st.sampled_from(["begin-next", "begin-any", "end", "commit", "fail",
                                "finish"]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, picks=st.lists(st.integers(0, 100), min_size=30, max_size=30))
def test_random_drives_keep_the_invariants(ops, picks):
    """Whatever a (buggy) driver does, the protocol object either refuses or stays
    consistent: completed steps are a prefix of STEPS, a commit implies guest switchover was
    entered, a recovery matches the commit, a terminal state is final."""
    clock = Clock()
    p = CoMigrationProtocol(clock)
    pick = itertools.cycle(picks)
    states = list(State)
    for op in ops:
        clock.tick(0.1)
        try:
            if op == "begin-next":
                done = len(p.completed)
                if done < len(STEPS):
                    p.begin(STEPS[done])
            elif op == "begin-any":
                p.begin(states[next(pick) % len(states)])
            elif op == "end":
                p.end()
            elif op == "commit":
                p.commit_guest()
            elif op == "fail":
                p.fail("x")
            else:
                p.finish(states[next(pick) % len(states)])
        except ProtocolViolation:
            pass
        assert p.completed == list(STEPS[:len(p.completed)])
        if State.GUEST_SWITCHOVER in p.completed:
            assert p.guest_committed
        if p.guest_committed:
            assert State.GUEST_SWITCHOVER in [r.state for r in p.history]
        if p.recovery is not None:
            assert p.recovery is (Recovery.RESTART_AT_DESTINATION if p.guest_committed
                                  else Recovery.ROLLBACK)
        if p.outcome is not None:
            assert p.outcome in TERMINAL and p.state is p.outcome and p.in_progress is None
        for rec in p.history:
            assert rec.seconds is None or rec.seconds >= 0
