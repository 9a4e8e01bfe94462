"""Generic free-running-index ring over a shared page (the kbdif/fbif style).

Xen's vkbd and vfb rings are *not* the ``DEFINE_RING_TYPES`` rings of ``ring.h``: they are
arrays of fixed-size event slots addressed with ``idx % LEN`` where ``LEN`` is not a power of
two (51 and 25), and the producer/consumer indices are free-running ``uint32_t`` values
(``RING_IDX`` in ``ring.h`` is ``unsigned int``) living in the same shared page.  This module
implements exactly that, sans-IO: functions over a :class:`memoryview` of the page, with the
geometry passed in explicitly as a :class:`RingLayout`.

Why everything is validated: the page is shared with the other domain, which may be hostile.
Both indices are re-read from the page on every call and the fill level ``prod - cons``
(mod 2**32) must be ``<= LEN``; otherwise :class:`RingError` is raised *before* any slot is
touched.  Slot offsets are computed as ``idx % LEN`` of a value already reduced to u32, so they
are always inside the ring whatever the peer writes, and each call does at most ``LEN`` slot
operations, so a hostile index can never cause an out-of-bounds access or a spin.  Slot bytes are
copied out of the shared page *before* they are decoded (no double fetch).

Memory ordering (the ``wmb``/``rmb``/``mb`` of the C drivers):

* producer: read ``cons`` -> write slot bytes -> write ``prod``  (QEMU: ``xen_mb(); slot = ev;
  xen_wmb(); in_prod = prod + 1``);
* consumer: read ``prod`` -> read slot bytes -> write ``cons``  (Linux kbdfront: ``prod =
  in_prod; rmb(); ...events...; mb(); in_cons = cons``).

This code issues those accesses in exactly that program order.  Each access is a separate C
call in CPython (a ``memcpy`` for slots, a 4-byte ``memoryview.cast('I')`` item store/load for
indices, which GCC compiles to a single aligned 32-bit ``mov`` -- an inference from
``Objects/memoryobject.c`` using a fixed-size ``memcpy``), and CPython cannot reorder separate
bytecodes.  On x86 (TSO) the hardware keeps store->store, load->load and load->store order, so
program order is all the C barriers buy there; that is sufficient for the simulator, whose
"domains" are Python code on x86 sharing ``mmap``/``bytearray`` memory.  On a weakly ordered
CPU (Arm) real Xen needs real fences (``dmb ish``) between those steps, which pure Python cannot
emit: a real backend on Arm must do the index/slot accesses through a C helper with
``__atomic_thread_fence``.  The only x86 hazard left, store->load reordering, does not arise
because no step stores and then depends on a later load of the same ring in the same call.

The 2**32 wrap: since ``2**32 % LEN != 0`` for LEN 51/25, the indices ``2**32 - 1`` and ``0``
both map to slot 0 (the C macros behave the same).  If both were outstanding at once the newer
event would overwrite the older unread one.  :func:`ring_put` therefore stops (as if the ring
were full) before writing an index whose slot is still occupied by an unconsumed index; the
caller keeps the rest queued and retries after the consumer's next notification.  The consumer
side reads exactly what C reads, so it stays interoperable with Linux/QEMU peers.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "RING_IDX_MASK",
    "RingError",
    "RingLayout",
    "ring_fill",
    "ring_get",
    "ring_put",
    "read_u32",
    "u32",
    "write_u32",
]

#: ``RING_IDX`` (ring.h) is ``unsigned int``: all index arithmetic is mod 2**32.
RING_IDX_MASK = 0xFFFFFFFF

#: Every ring in this package lives in one Xen page.
XEN_PAGE_SIZE = 4096

# Xen's x86/Arm ABIs are little-endian; on a little-endian host with a 4-byte C ``unsigned int``
# the index accesses go through ``memoryview.cast("I")`` (one 32-bit access each).
_NATIVE_LE = struct.pack("=I", 1) == struct.pack("<I", 1) and struct.calcsize("I") == 4


class RingError(ValueError):
    """The shared ring is in a state no correct peer can produce (hostile or corrupt indices).

    Raised before any slot is read or written, so the page is left as it was; the backend
    should close the device with this message as the logged reason.
    """


def u32(value: int) -> int:
    """Reduce ``value`` to a ``uint32_t`` (what C does on every index store)."""
    return value & RING_IDX_MASK


def read_u32(mv: memoryview, offset: int) -> int:
    """Load the little-endian u32 at byte ``offset`` (must be 4-aligned) as one 32-bit load."""
    if offset % 4 or offset < 0 or offset + 4 > len(mv):
        raise ValueError(f"u32 offset {offset} not aligned/in range for {len(mv)}-byte view")
    return int(mv[offset:offset + 4].cast("I")[0]) if _NATIVE_LE else _unpack_u32(mv, offset)


def write_u32(mv: memoryview, offset: int, value: int) -> None:
    """Store ``value`` (already a u32) at byte ``offset`` as one 32-bit store."""
    if not 0 <= value <= RING_IDX_MASK:
        raise ValueError(f"u32 value out of range: {value}")
    if offset % 4 or offset < 0 or offset + 4 > len(mv):
        raise ValueError(f"u32 offset {offset} not aligned/in range for {len(mv)}-byte view")
    if _NATIVE_LE:
        mv[offset:offset + 4].cast("I")[0] = value
    else:  # pragma: no cover - big-endian hosts are not a Xen target here
        struct.pack_into("<I", mv, offset, value)


def _unpack_u32(mv: memoryview, offset: int) -> int:  # pragma: no cover - big-endian only
    return int(struct.unpack_from("<I", mv, offset)[0])


@dataclass(frozen=True)
class RingLayout:
    """Geometry of one ring inside a shared page (all values in bytes except ``length``).

    Mirrors the ``XEN*_RING_OFFS`` / ``*_RING_SIZE`` / ``*_EVENT_SIZE`` macro triple plus the
    offsets of the two index fields in the page struct.
    """

    name: str
    cons_offset: int
    prod_offset: int
    ring_offset: int
    ring_size: int
    slot_size: int

    def __post_init__(self) -> None:
        if self.slot_size <= 0 or self.ring_size < self.slot_size:
            raise ValueError(f"{self.name}: bad slot/ring size")
        for off in (self.cons_offset, self.prod_offset):
            if off % 4 or off < 0:
                raise ValueError(f"{self.name}: index offset {off} not 4-aligned")
        if self.ring_offset < 0 or self.ring_offset + self.ring_size > XEN_PAGE_SIZE:
            raise ValueError(f"{self.name}: ring outside the page")
        # Derived once: ring_put/ring_get run on every key press (the latency path).
        object.__setattr__(self, "_need", max(self.ring_offset + self.ring_size,
                                              self.cons_offset + 4, self.prod_offset + 4))

    @property
    def length(self) -> int:
        """Number of slots, ``RING_SIZE / EVENT_SIZE`` (integer division, as in the C macro)."""
        return self.ring_size // self.slot_size

    def slot_offset(self, idx: int) -> int:
        """Byte offset of the slot for free-running index ``idx`` (``RING_REF(page, idx)``)."""
        return self.ring_offset + (u32(idx) % self.length) * self.slot_size

    def check_view(self, mv: memoryview, *, writable: bool) -> None:
        """Refuse a view that is too short (would make slot access go out of bounds)."""
        if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
            raise ValueError(f"{self.name}: need a 1-D byte memoryview")
        if len(mv) < self._need:  # type: ignore[attr-defined]
            raise ValueError(f"{self.name}: page view is {len(mv)} bytes, "
                             f"need {self._need}")  # type: ignore[attr-defined]
        if writable and mv.readonly:
            raise ValueError(f"{self.name}: page view is read-only")


def ring_fill(mv: memoryview, layout: RingLayout) -> tuple[int, int, int]:
    """Return ``(cons, prod, fill)`` read from the page, validating ``fill <= LEN``.

    ``fill = (prod - cons) mod 2**32``.  Anything above ``LEN`` means one of the indices was
    written by something other than a correct peer; that raises :class:`RingError`.
    """
    layout.check_view(mv, writable=False)
    return _fill(mv, layout)


def _fill(mv: memoryview, layout: RingLayout) -> tuple[int, int, int]:
    """:func:`ring_fill` on a view already checked (one cons load, then one prod load)."""
    if _NATIVE_LE and not len(mv) % 4:
        idx = mv.cast("I")  # one 32-bit load per index, no per-index slicing
        cons = idx[layout.cons_offset >> 2]
        prod = idx[layout.prod_offset >> 2]
        idx.release()
    else:
        cons = read_u32(mv, layout.cons_offset)
        prod = read_u32(mv, layout.prod_offset)
    fill = (prod - cons) & RING_IDX_MASK
    if fill > layout.length:
        raise RingError(
            f"{layout.name}: prod {prod:#x} - cons {cons:#x} = {fill} exceeds ring length "
            f"{layout.length}"
        )
    return cons, prod, fill


def _slot_busy(layout: RingLayout, cons: int, prod: int) -> bool:
    """True if ``prod``'s slot is still held by an unconsumed index in ``[cons, prod)``.

    Without a 2**32 wrap inside the window this only happens when the ring is full.  Across the
    wrap ``2**32 % LEN != 0`` makes distinct indices share a slot (see the module docstring).
    """
    length = layout.length
    target = prod % length
    idx = cons
    while idx != prod:  # at most LEN iterations: fill was validated <= LEN
        if idx % length == target:
            return True
        idx = u32(idx + 1)
    return False


def ring_put(mv: memoryview, layout: RingLayout, slots: Sequence[bytes]) -> int:
    """Producer side: write as many ``slots`` as fit, then publish them; return how many.

    Each item must be at most ``slot_size`` bytes (it is zero-padded to the slot, like the C
    code's ``memset`` + struct assignment).  Items ``slots[n:]`` that did not fit (``n`` being
    the return value) are left to the caller, who retries after the consumer's next
    notification.  A sequence, not an iterator, so nothing is consumed without being written.
    ``prod`` is written once, after all slot bytes (the ``wmb`` point), so the consumer never
    sees a half-written slot.

    This runs once per key press, so it is written for speed without giving up a check: the
    view is validated once, the indices are read once, and the slot-sharing scan of
    :func:`_slot_busy` only runs while the unconsumed window crosses 2**32 (``cons > prod``),
    the only case in which it can find anything below a full ring.
    """
    layout.check_view(mv, writable=True)
    cons, prod, fill = _fill(mv, layout)
    size = layout.slot_size
    for data in slots:
        if len(data) > size:
            raise ValueError(f"{layout.name}: {len(data)}-byte item exceeds slot size")
    length = layout.length
    base = layout.ring_offset
    written = 0
    for data in slots:
        if fill >= length or (fill and cons > prod and _slot_busy(layout, cons, prod)):
            break
        off = base + (prod % length) * size
        mv[off:off + size] = data if len(data) == size else bytes(data).ljust(size, b"\0")
        prod = (prod + 1) & RING_IDX_MASK
        fill += 1
        written += 1
    if written:
        # Publish: the slot stores above precede this index store in program order (wmb).
        write_u32(mv, layout.prod_offset, prod)
    return written


def ring_get(mv: memoryview, layout: RingLayout, max_items: int | None = None) -> list[bytes]:
    """Consumer side: copy out the pending slots (oldest first) and advance ``cons``.

    ``prod`` is read once (then slots, the ``rmb`` point); each slot is copied to ``bytes`` before
    anyone decodes it, and ``cons`` is written once afterwards (the ``mb`` point) so the producer
    cannot reuse a slot we have not yet copied.  ``max_items`` bounds the batch (default: all,
    which is at most ``LEN``).
    """
    layout.check_view(mv, writable=True)
    cons, prod, fill = _fill(mv, layout)
    if max_items is not None:
        if max_items < 0:
            raise ValueError("max_items must be >= 0")
        fill = min(fill, max_items)
    if not fill:
        return []
    size = layout.slot_size
    length = layout.length
    first = cons % length
    if cons + fill <= RING_IDX_MASK + 1:
        # The usual case: the slots are one run of the ring, or two when it wraps: one or two
        # copies and a cut per slot instead of an index computation and a copy per slot (a
        # batch of UPDATEs is read on every echo, in a PV domain where each Python step is
        # ~10x dearer than natively).
        base = layout.ring_offset
        end = first + fill
        if end <= length:
            data = bytes(mv[base + first * size:base + end * size])
        else:
            data = (bytes(mv[base + first * size:base + length * size])
                    + bytes(mv[base:base + (end - length) * size]))
        out = [data[i:i + size] for i in range(0, fill * size, size)]
    else:
        # The window crosses 2**32, which LEN does not divide: slot by slot.
        out = []
        idx = cons
        for _ in range(fill):
            off = layout.slot_offset(idx)
            out.append(bytes(mv[off:off + size]))
            idx = u32(idx + 1)
    write_u32(mv, layout.cons_offset, u32(cons + fill))
    return out
