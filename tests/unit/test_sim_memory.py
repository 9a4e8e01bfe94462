"""Grant table v1 state machine over a plain buffer (no files): Xen's map/unmap checks and
Linux's end-foreign-access rule."""

from __future__ import annotations

import errno
import struct

import pytest

from dmore_nova.xen.sim.memory import (
    GNTPIN_MAX,
    GRANT_ENTRY_V1_SIZE,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GrantError,
    GrantTable,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    _runs,
    read_entry,
    write_entry,
)

GRANTER, MAPPER, OTHER = 5, 0, 7


@pytest.fixture
def table() -> GrantTable:
    return GrantTable(GRANTER, memoryview(bytearray(64 * GRANT_ENTRY_V1_SIZE)), nr_pages=16,
                      nr_entries=64)


def test_entry_layout_matches_grant_entry_v1(table):
    write_entry(table.shared, 3, domid=0x1234, frame=0xA0B0C0D0, flags=GTF_permit_access)
    raw = bytes(table.shared[24:32])
    assert raw == struct.pack("<HHI", GTF_permit_access, 0x1234, 0xA0B0C0D0)
    assert read_entry(table.shared, 3) == (GTF_permit_access, 0x1234, 0xA0B0C0D0)


def _flags(table: GrantTable, ref: int) -> int:
    return read_entry(table.shared, ref)[0]


def test_map_sets_status_flags_and_unmap_clears_them(table):
    write_entry(table.shared, 8, MAPPER, 4, GTF_permit_access)
    assert table.map(MAPPER, 8, readonly=False) == 4
    assert _flags(table, 8) == GTF_permit_access | GTF_reading | GTF_writing
    assert table.map(MAPPER, 8, readonly=True) == 4
    table.unmap(8, readonly=False)
    assert _flags(table, 8) == GTF_permit_access | GTF_reading   # reader still there
    table.unmap(8, readonly=True)
    assert _flags(table, 8) == GTF_permit_access
    assert table.nr_active == 0


def test_readonly_map_sets_only_reading(table):
    write_entry(table.shared, 8, MAPPER, 4, GTF_permit_access | GTF_readonly)
    table.map(MAPPER, 8, readonly=True)
    assert _flags(table, 8) == GTF_permit_access | GTF_readonly | GTF_reading


@pytest.mark.parametrize("flags,domid,readonly,status", [
    (GTF_permit_access, OTHER, False, GNTST_general_error),        # granted to someone else
    (0, MAPPER, False, GNTST_general_error),                       # not granted / revoked
    (2, MAPPER, True, GNTST_general_error),                        # accept_transfer, not access
    (GTF_permit_access | GTF_readonly, MAPPER, False, GNTST_general_error),  # write a r/o grant
])
def test_map_refusals(table, flags, domid, readonly, status):
    write_entry(table.shared, 9, domid, 2, flags)
    with pytest.raises(GrantError) as e:
        table.map(MAPPER, 9, readonly)
    assert e.value.status == status
    assert e.value.errno == errno.EPERM
    assert _flags(table, 9) == flags          # nothing was left pinned
    assert table.active(9) is None


def test_bad_ref_and_bad_frame(table):
    with pytest.raises(GrantError) as e:
        table.map(MAPPER, 64, False)
    assert (e.value.status, e.value.errno) == (GNTST_bad_gntref, errno.EINVAL)
    with pytest.raises(GrantError) as e:
        table.map(MAPPER, -1, False)
    assert e.value.status == GNTST_bad_gntref
    write_entry(table.shared, 10, MAPPER, 16, GTF_permit_access)   # frame == nr_pages
    with pytest.raises(GrantError) as e:
        table.map(MAPPER, 10, False)
    assert (e.value.status, e.value.errno) == (GNTST_bad_page, errno.EINVAL)
    assert _flags(table, 10) == GTF_permit_access


def test_pinned_entry_refuses_another_domain(table):
    write_entry(table.shared, 8, MAPPER, 4, GTF_permit_access)
    table.map(MAPPER, 8, readonly=True)
    with pytest.raises(GrantError):
        table.map(OTHER, 8, readonly=True)


def test_pinned_frame_is_latched_like_xen(table):
    """A hostile granter rewriting the entry while it is pinned does not move the mapping."""
    write_entry(table.shared, 8, MAPPER, 4, GTF_permit_access)
    table.map(MAPPER, 8, readonly=True)
    write_entry(table.shared, 8, MAPPER, 15, GTF_permit_access | GTF_reading)
    assert table.map(MAPPER, 8, readonly=True) == 4


def test_pin_overflow_is_refused(table):
    write_entry(table.shared, 8, MAPPER, 4, GTF_permit_access)
    for _ in range(GNTPIN_MAX):
        table.map(MAPPER, 8, readonly=True)
    with pytest.raises(GrantError):
        table.map(MAPPER, 8, readonly=True)


def test_unmap_of_unpinned_is_bad_handle(table):
    with pytest.raises(GrantError) as e:
        table.unmap(8, readonly=True)
    assert e.value.status == GNTST_bad_handle
    write_entry(table.shared, 8, MAPPER, 4, GTF_permit_access)
    table.map(MAPPER, 8, readonly=True)
    with pytest.raises(GrantError):
        table.unmap(8, readonly=False)   # pinned read-only, not writable


def test_end_foreign_access_refuses_while_mapped(table):
    write_entry(table.shared, 8, MAPPER, 4, GTF_permit_access)
    table.map(MAPPER, 8, readonly=False)
    assert table.end_foreign_access(8) is False
    assert _flags(table, 8) & GTF_permit_access           # still granted
    table.unmap(8, readonly=False)
    assert table.end_foreign_access(8) is True
    assert _flags(table, 8) == 0
    with pytest.raises(GrantError) as e:
        table.map(MAPPER, 8, readonly=True)                # revoked
    assert e.value.errno == errno.EPERM


def test_runs_groups_consecutive_frames():
    assert _runs([5, 6, 7, 2, 3, 9]) == [(0, 5, 3), (3, 2, 2), (5, 9, 1)]
    assert _runs([4]) == [(0, 4, 1)]
    assert _runs([3, 3]) == [(0, 3, 1), (1, 3, 1)]
