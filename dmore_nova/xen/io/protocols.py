"""ABI names a frontend publishes in its ``protocol`` node (``public/io/protocols.h``).

For vfb the ABI decides the layout of ``xenfb_page.pd[]`` (``unsigned long``: 4 bytes at offset
36 for x86_32, 8 bytes at offset 40 for x86_64).  The string is guest-written, so
:func:`abi_long_size` rejects anything that is not one of the header's values.
"""

from __future__ import annotations

import platform

__all__ = [
    "XEN_IO_PROTO_ABI_ARM",
    "XEN_IO_PROTO_ABI_NATIVE",
    "XEN_IO_PROTO_ABI_X86_32",
    "XEN_IO_PROTO_ABI_X86_64",
    "KNOWN_PROTOCOLS",
    "abi_long_size",
    "native_protocol",
]

XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM = "arm-abi"

KNOWN_PROTOCOLS = (XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64, XEN_IO_PROTO_ABI_ARM)

#: ``sizeof(unsigned long)`` in each ABI as this package uses it.  ``arm-abi`` is shared by
#: 32- and 64-bit Arm guests, so it does not determine ``unsigned long`` by itself; like QEMU's
#: ``xenfb_map_fb`` (which falls back to the backend's native layout for any protocol other
#: than the x86 pair), we assume a 64-bit (aarch64) guest.  32-bit Arm vfb guests are not
#: supported by this mapping.
_LONG_SIZE = {XEN_IO_PROTO_ABI_X86_32: 4, XEN_IO_PROTO_ABI_X86_64: 8, XEN_IO_PROTO_ABI_ARM: 8}


def native_protocol(machine: str | None = None) -> str:
    """``XEN_IO_PROTO_ABI_NATIVE`` for ``machine`` (default: this host), as protocols.h picks it.

    The simulated guest publishes this, as Linux's frontends publish their native ABI.
    """
    m = (machine or platform.machine()).lower()
    if m in ("x86_64", "amd64"):
        return XEN_IO_PROTO_ABI_X86_64
    if m in ("i386", "i486", "i586", "i686", "x86"):
        return XEN_IO_PROTO_ABI_X86_32
    if m.startswith(("arm", "aarch64")):
        return XEN_IO_PROTO_ABI_ARM
    raise ValueError(f"no Xen I/O protocol for machine {m!r} (protocols.h: 'arch fixup needed')")


#: XEN_IO_PROTO_ABI_NATIVE of the host running this code.
try:
    XEN_IO_PROTO_ABI_NATIVE: str | None = native_protocol()
except ValueError:  # pragma: no cover - only on non-Xen architectures
    XEN_IO_PROTO_ABI_NATIVE = None


def abi_long_size(protocol: str) -> int:
    """``sizeof(unsigned long)`` for a guest that published ``protocol``; ValueError if unknown."""
    try:
        return _LONG_SIZE[protocol]
    except (KeyError, TypeError):
        raise ValueError(f"unknown Xen I/O protocol {protocol!r}") from None
