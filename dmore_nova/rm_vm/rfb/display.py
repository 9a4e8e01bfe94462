"""The two seams between the RFB server and what it shows and drives.

A :class:`DisplaySource` is a framebuffer that changes (the demo display now, the vfb backend
later); an :class:`InputSink` receives what viewers type and point (the demo display now, the vkbd
backend later).  Protocol code never learns which one it talks to, so the Xen devices plug in
without touching the RFB code (the same way Nova's ``virt/driver.py`` hides hypervisors).

Push, not pull: a display calls its listeners' :meth:`DisplayListener.damage` when pixels change,
and the server answers a pending incremental FramebufferUpdateRequest only then.  Nothing polls.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def empty(self) -> bool:
        return self.w <= 0 or self.h <= 0

    def clip(self, width: int, height: int) -> Rect:
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.x + self.w, width), min(self.y + self.h, height)
        return Rect(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))

    def union(self, other: Rect) -> Rect:
        x0, y0 = min(self.x, other.x), min(self.y, other.y)
        x1 = max(self.x + self.w, other.x + other.w)
        y1 = max(self.y + self.h, other.y + other.h)
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def intersects(self, other: Rect) -> bool:
        return (self.x < other.x + other.w and other.x < self.x + self.w
                and self.y < other.y + other.h and other.y < self.y + self.h)

    @property
    def area(self) -> int:
        return max(self.w, 0) * max(self.h, 0)


@dataclass(frozen=True)
class Cursor:
    """A pointer shape: ``pixels`` (h, w) uint32 0x00RRGGBB, ``mask`` (h, w) bool (opaque)."""

    hot_x: int
    hot_y: int
    pixels: np.ndarray
    mask: np.ndarray


class DisplayListener(Protocol):
    """What a display tells the server. Called on the event loop's thread."""

    def damage(self, rect: Rect) -> None:
        """Pixels inside ``rect`` changed (already clipped to the current size)."""

    def resized(self, width: int, height: int, reason: int) -> None:
        """The framebuffer has a new size; ``reason`` is an ExtendedDesktopSize reason code
        (0 = server/guest initiated, 1 = this client's request, 2 = another client's request)."""

    def copied(self, src_x: int, src_y: int, dst: Rect) -> None:
        """``dst`` now holds what was at (src_x, src_y): a CopyRect opportunity."""

    def leds_changed(self) -> None:
        """The display's ``led_state`` changed."""

    def flush(self) -> None:
        """The source finished a batch of changes: send what is due now rather than on the
        event loop's next turn (damage alone is coalesced until then)."""


class DisplaySource(abc.ABC):
    """A framebuffer the RFB server can show."""

    def __init__(self) -> None:
        self._listeners: list[DisplayListener] = []
        #: Inside :meth:`batch`: listeners note damage and wait for the flush at its end.
        self.batching = False
        self._batch = _Batch(self)

    @property
    @abc.abstractmethod
    def width(self) -> int: ...

    @property
    @abc.abstractmethod
    def height(self) -> int: ...

    @property
    def name(self) -> str:
        return "dmore"

    @abc.abstractmethod
    def framebuffer(self) -> np.ndarray:
        """A (height, width) ``uint32`` array of 0x00RRGGBB pixels (may be a strided view over
        guest memory: read it, never write it, and copy what must not change under you)."""

    def sync(self, rect: Rect) -> None:
        """A viewer is about to be sent ``rect``: a display that serves viewers a copy brings
        it up to date there, telling every viewer what changed (``notify_damage``).  Default:
        nothing (the framebuffer is the picture)."""

    def cursor(self) -> Cursor | None:
        """The pointer shape viewers should draw locally (Cursor pseudo-encoding), or None to
        leave the client's own cursor."""
        return None

    @property
    def led_state(self) -> int | None:
        """Keyboard LEDs (bit 0 Scroll, 1 Num, 2 Caps Lock) for the QEMU LED State
        pseudo-encoding, or None when unknown.  Call :meth:`notify_leds` when it changes."""
        return None

    def request_resize(self, width: int, height: int) -> int:
        """A viewer's SetDesktopSize. Return an ExtendedDesktopSize status code: 0 = accepted
        (the display will call ``resized``), 1 = prohibited, 2 = out of resources, 3 = invalid."""
        return 1

    # -- listeners ---------------------------------------------------------------------------
    def add_listener(self, listener: DisplayListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: DisplayListener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def notify_damage(self, rect: Rect) -> None:
        rect = rect.clip(self.width, self.height)
        if rect.empty:
            return
        for listener in list(self._listeners):
            listener.damage(rect)

    def notify_flush(self) -> None:
        for listener in list(self._listeners):
            listener.flush()

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Damage notified inside goes to viewers at the end, at once (:meth:`notify_flush`).

        Why: a viewer that scheduled its send for the event loop's next turn costs that turn
        (an ``epoll_wait`` and a clock read: system calls of ~0.1-0.2 ms each in a PV domain
        under emulation) even when the flush already sent it.  The flush runs outside the
        batch, so damage found while sending (:meth:`sync`) is scheduled as usual.  A plain
        context manager made once, not a generator per batch: a batch is every read of the
        vfb's ring, on the echo's path."""
        return self._batch

    def end_batch(self) -> None:
        """The end of :meth:`batch` (also when it raised): flush what it noted."""
        self.batching = False
        self.notify_flush()

    def notify_leds(self) -> None:
        for listener in list(self._listeners):
            listener.leds_changed()

    def notify_resized(self, reason: int = 0) -> None:
        for listener in list(self._listeners):
            listener.resized(self.width, self.height, reason)

    def notify_copied(self, src_x: int, src_y: int, dst: Rect) -> None:
        for listener in list(self._listeners):
            listener.copied(src_x, src_y, dst)


class _Batch(contextlib.AbstractContextManager):
    __slots__ = ("source",)

    def __init__(self, source: DisplaySource) -> None:
        self.source = source

    def __enter__(self) -> None:
        self.source.batching = True

    def __exit__(self, *exc_info: object) -> None:
        self.source.end_batch()


@dataclass(frozen=True, slots=True)
class KeyInput:
    """One key press or release, from a plain KeyEvent or a QEMU Extended Key Event.

    ``keysym`` is the X11 keysym the client sent (0 if it sent none); ``scancode`` is the XT
    scancode when the client sent one (QEMU extended key event; E0-prefixed keys as 0x80|code,
    as QEMU's extension encodes them), else ``None``.  The vkbd backend prefers the scancode
    (layout-independent) and falls back to a US-layout keysym table.
    """

    down: bool
    keysym: int
    scancode: int | None = None


#: Button mask bits of RFB PointerEvent: 1..3 = left, middle, right; 4/5 = wheel up/down;
#: 6/7 = wheel left/right.
BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT = 0x01, 0x02, 0x04
WHEEL_UP, WHEEL_DOWN, WHEEL_LEFT, WHEEL_RIGHT = 0x08, 0x10, 0x20, 0x40


@dataclass(frozen=True, slots=True)
class PointerInput:
    x: int
    y: int
    buttons: int


class InputSink(Protocol):
    """Where viewers' input goes. Called on the event loop's thread, in arrival order."""

    def key(self, event: KeyInput) -> None: ...

    def pointer(self, event: PointerInput) -> None: ...

    def flush_input(self) -> None:
        """The end of what one read from a viewer carried (e.g. a key's press and release):
        a sink that batches delivery (one notify to the guest) delivers now."""
