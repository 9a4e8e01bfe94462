"""The xl migration follower's decisions, from recorded xenstore observations (no Xen).

The sequences are what ``xl migrate -s "" guest "xl migrate-receive"`` (Xen 4.17, localhost)
produced on the xenbox: guest dom3 -> dom4 (run of 2026-11-26, status.json of the follower):
the suspend request came *before* ``@introduceDomain`` (libxl introduces the restored domain
to xenstored only once its memory arrived; its ``name`` node exists from the start), the
guest's ``""`` acknowledgement right after the request, the rename to ``guest`` while the
old domain is suspended, and libxl's teardown of the old vinput backend (online=0, state=5)
last, before the old domain is released.
"""

from __future__ import annotations

import pytest

from dmore_nova.rm_vm.xl_follower import (
    AnswerClosed,
    Freeze,
    PlugIncoming,
    Rehome,
    ThawAtSource,
    XlMigrationTracker,
)

OLD_BE = "/local/domain/0/backend/vinput/3/0"


def test_recorded_localhost_migration_step_by_step():
    t = XlMigrationTracker("guest", 3)
    # libxl__domain_suspend: control/shutdown = "suspend"; the guest acks with ""
    assert t.on_shutdown(3, b"suspend") == [Freeze(3, "suspend")]
    assert t.on_shutdown(3, b"") == []  # one freeze only
    # @introduceDomain: the restored domain, still named <name>--incoming
    names = {0: b"Domain-0", 3: b"guest", 4: b"guest--incoming"}
    assert t.on_domains(names) == [PlugIncoming(4)]
    assert t.on_domains(names) == []  # found once
    # its name watch fires at once (still --incoming), then xl renames it and unpauses it
    assert t.on_name(4, b"guest--incoming") == []
    assert t.on_name(4, b"guest") == [Rehome(3, 4)]
    assert t.on_name(4, b"guest") == []  # re-home runs once
    # the old domain is released only after the new one started: not a failed migration
    assert t.on_released({0, 3, 4}) == []
    t.rehomed(4)
    assert (t.domid, t.incoming, t.suspend_requested) == (4, None, False)
    # libxl__initiate_device_generic_remove on the old vinput backend
    assert t.on_old_backend(OLD_BE, b"0", b"5") == [AnswerClosed(OLD_BE)]
    assert t.on_released({0, 4}) == []


def test_a_second_migration_starts_from_scratch():
    t = XlMigrationTracker("guest", 3)
    t.on_shutdown(3, b"suspend")
    t.on_domains({3: b"guest", 4: b"guest--incoming"})
    assert t.on_name(4, b"guest") == [Rehome(3, 4)]
    t.rehomed(4)
    assert t.on_shutdown(3, b"suspend") == []  # the old domid is nobody now
    assert t.on_shutdown(4, b"suspend") == [Freeze(4, "suspend")]
    assert t.on_domains({4: b"guest", 5: b"guest--incoming"}) == [PlugIncoming(5)]
    assert t.on_name(5, b"guest") == [Rehome(4, 5)]


def test_acknowledgement_read_first_counts_as_the_suspend():
    """Watch events coalesce: the first value read may already be the guest's "" answer."""
    t = XlMigrationTracker("guest", 3)
    assert t.on_shutdown(3, b"") == [Freeze(3, "")]


@pytest.mark.parametrize("request_", [b"poweroff", b"reboot", b"halt", b"crash"])
def test_other_requests_and_their_acknowledgement_do_not_freeze(request_):
    t = XlMigrationTracker("guest", 3)
    assert t.on_shutdown(3, request_) == []
    assert t.on_shutdown(3, b"") == []
    assert not t.suspend_requested
    # ... and a suspend request after that one is one again
    assert t.on_shutdown(3, b"suspend") == [Freeze(3, "suspend")]


def test_other_domains_and_missing_nodes_are_ignored():
    t = XlMigrationTracker("guest", 3)
    assert t.on_shutdown(7, b"suspend") == []
    assert t.on_shutdown(3, None) == []
    # another guest's incoming domain, and our own name on another domain, are not ours
    assert t.on_domains({3: b"guest", 5: b"other--incoming", 6: b"guest",
                         7: b"guest--incoming-not", 8: None}) == []
    # a domain renamed to our name before we knew it as the incoming one: not followed
    assert t.on_name(6, b"guest") == []
    assert t.on_domains({3: b"guest", 9: b"guest--incoming"}) == [PlugIncoming(9)]
    assert t.on_name(9, b"other") == []
    assert t.on_name(9, None) == []
    assert not t.rehoming


def test_incoming_domain_gone_before_it_started_thaws_at_the_source():
    """xl migrate failed after the suspend (the receiver died): libxl resumes the guest with
    suspend_cancel; its ring was never zeroed, held input goes to it."""
    t = XlMigrationTracker("guest", 3)
    t.on_shutdown(3, b"suspend")
    t.on_domains({3: b"guest", 4: b"guest--incoming"})
    assert t.on_released({0, 3, 4}) == []  # another domain went
    assert t.on_released({0, 3}) == [ThawAtSource(3)]
    assert t.incoming is None and not t.suspend_requested
    # a later, successful attempt is followed normally
    assert t.on_shutdown(3, b"suspend") == [Freeze(3, "suspend")]
    assert t.on_domains({3: b"guest", 5: b"guest--incoming"}) == [PlugIncoming(5)]


def test_incoming_domain_gone_without_a_suspend_only_forgets_it():
    t = XlMigrationTracker("guest", 3)
    t.on_domains({3: b"guest", 4: b"guest--incoming"})
    assert t.on_released({0, 3}) == []
    assert t.incoming is None


def test_release_while_rehoming_is_not_a_rollback():
    t = XlMigrationTracker("guest", 3)
    t.on_shutdown(3, b"suspend")
    t.on_domains({3: b"guest", 4: b"guest--incoming"})
    t.on_name(4, b"guest")
    assert t.on_released({0}) == []


@pytest.mark.parametrize("online,state,answer", [
    (b"0", b"5", True),    # libxl: online=0 + Closing, waits for Closed
    (b"0", b"4", True),    # online=0 seen before the Closing write
    (b"0", b"6", False),   # already answered
    (b"1", b"5", False),   # not a teardown (a frontend closing)
    (None, None, False),   # removed already
    (b"0", None, False),
])
def test_old_backend_answered_only_while_libxl_waits(online, state, answer):
    t = XlMigrationTracker("guest", 3)
    assert t.on_old_backend(OLD_BE, online, state) == ([AnswerClosed(OLD_BE)] if answer else [])


def test_a_name_is_needed():
    with pytest.raises(ValueError, match="name"):
        XlMigrationTracker("", 3)
