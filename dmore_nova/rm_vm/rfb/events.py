"""Events the sans-IO RFB core hands to its transport, one per client message or state change.

Key and pointer input reuse :class:`~dmore_nova.rm_vm.rfb.display.KeyInput` and
:class:`~dmore_nova.rm_vm.rfb.display.PointerInput` so that what a viewer types travels unchanged
from the protocol to the vkbd backend; the others are defined here.  All are frozen: an event is a
fact about bytes already received, nobody should edit it on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput, Rect
from dmore_nova.rm_vm.rfb.pixelformat import PixelFormat

__all__ = [
    "AuthFailed",
    "ClientCutText",
    "ClientInit",
    "ConnectionClosed",
    "EnableContinuousUpdates",
    "Event",
    "FramebufferUpdateRequest",
    "KeyInput",
    "PointerInput",
    "Screen",
    "SetDesktopSize",
    "SetEncodings",
    "SetPixelFormat",
]


@dataclass(frozen=True, slots=True)
class ClientInit:
    """The handshake finished (ServerInit is queued); the connection is now NORMAL.

    ``shared`` False asks for exclusive access (rfbproto 7.3.1): what to do with the other
    viewers is the server's policy, not the protocol's.
    """

    shared: bool


@dataclass(frozen=True, slots=True)
class SetPixelFormat:
    """The client switched pixel format (already validated and in ``conn.pixel_format``)."""

    pixel_format: PixelFormat


@dataclass(frozen=True, slots=True)
class SetEncodings:
    """The client's encodings in preference order; ``conn``'s capability flags are updated."""

    encodings: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FramebufferUpdateRequest:
    """``rect`` is already cropped to the framebuffer (rfbproto 7.5.3) and may be empty."""

    incremental: bool
    rect: Rect


@dataclass(frozen=True, slots=True)
class ClientCutText:
    """Latin-1 clipboard text (rfbproto 7.5.6), at most ``ServerConfig.max_cut_text`` bytes."""

    text: bytes


@dataclass(frozen=True, slots=True)
class Screen:
    """One SCREEN of SetDesktopSize / ExtendedDesktopSize (rfbproto 7.8.11)."""

    id: int
    x: int
    y: int
    w: int
    h: int
    flags: int


@dataclass(frozen=True, slots=True)
class SetDesktopSize:
    """A viewer asks for a new framebuffer size/layout; the server must answer with an
    ExtendedDesktopSize rectangle (reason 1) whatever it decides."""

    width: int
    height: int
    screens: tuple[Screen, ...]


@dataclass(frozen=True, slots=True)
class EnableContinuousUpdates:
    """Continuous updates switched on for ``rect`` (cropped) or off.  On disable the core has
    already queued EndOfContinuousUpdates, as rfbproto 7.5.7 requires."""

    enable: bool
    rect: Rect


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """Authentication failed (wrong password, refused credentials or subtype).

    Always followed by :class:`ConnectionClosed`; reported separately so that the transport can
    log and rate-limit authentication failures apart from mere protocol errors.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over (state CLOSED); ``error`` False for an orderly end by the client."""

    reason: str
    error: bool


Event = (ClientInit | SetPixelFormat | SetEncodings | FramebufferUpdateRequest | KeyInput
         | PointerInput | ClientCutText | SetDesktopSize | EnableContinuousUpdates | AuthFailed
         | ConnectionClosed)
