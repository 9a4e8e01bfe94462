"""Lazy ctypes loading of Xen's stable tool libraries, and guest memory as a ``memoryview``.

Xen ships no Python module for event channels, grant maps or foreign maps (only
``xen.lowlevel.xc/xs``), so the real implementation calls the same C libraries QEMU's Xen backends
use: libxenevtchn, libxengnttab and libxenforeignmemory (Debian: ``libxenevtchn1``,
``libxengnttab1``, ``libxenforeignmemory1``; their ABI is stable, hence the ``.so.1`` names).

Nothing is loaded at import: the module must import, and its users be unit-testable, on machines
without Xen.  The first *use* loads the library and declares every prototype; a missing library
or symbol raises :class:`~dmore_nova.xen.api.XenUnavailable` naming what is missing.

Every prototype is spelled twice, as a ctypes type and as the C type in the header
(:class:`CType`), so that a test can compile the C spelling against ``/usr/include/xen*.h`` and
compare ``sizeof``/signedness with the ctypes side.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import platform
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dmore_nova.xen import api

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CType:
    """One type of a prototype: what ctypes passes, and how the Xen header spells it."""

    ctype: object  # a ctypes type, or None for void
    c: str


def _xen_pfn_ctype() -> type:
    # xen/include/public/arch-x86/xen.h: ``typedef unsigned long xen_pfn_t``;
    # arch-arm.h: ``typedef uint64_t xen_pfn_t``.
    return ctypes.c_uint64 if platform.machine() in ("aarch64", "arm64", "armv7l") else \
        ctypes.c_ulong


# Scalar types of the Xen headers.
VOID = CType(None, "void")
C_INT = CType(ctypes.c_int, "int")
C_UINT = CType(ctypes.c_uint, "unsigned int")
UINT32 = CType(ctypes.c_uint32, "uint32_t")
SIZE_T = CType(ctypes.c_size_t, "size_t")
EVTCHN_PORT_T = CType(ctypes.c_uint32, "evtchn_port_t")
XENEVTCHN_PORT_OR_ERROR_T = CType(ctypes.c_int, "xenevtchn_port_or_error_t")
XEN_PFN_T = CType(_xen_pfn_ctype(), "xen_pfn_t")
GRANT_REF_T = CType(ctypes.c_uint32, "grant_ref_t")
DOMID_T = CType(ctypes.c_uint16, "domid_t")
# Pointers (opaque handles stay c_void_p: we never look inside them).
VOID_P = CType(ctypes.c_void_p, "void *")
LOGGER_P = CType(ctypes.c_void_p, "struct xentoollog_logger *")
EVTCHN_HANDLE_P = CType(ctypes.c_void_p, "xenevtchn_handle *")
GNTTAB_HANDLE_P = CType(ctypes.c_void_p, "xengnttab_handle *")
FMEM_HANDLE_P = CType(ctypes.c_void_p, "xenforeignmemory_handle *")
XC_INTERFACE_P = CType(ctypes.c_void_p, "xc_interface *")
XC_DOMINFO_P = CType(ctypes.c_void_p, "xc_dominfo_t *")
XEN_PFN_ARRAY = CType(ctypes.POINTER(XEN_PFN_T.ctype), "const xen_pfn_t *")  # type: ignore[arg-type]
INT_ARRAY = CType(ctypes.POINTER(ctypes.c_int), "int *")

#: The scalar types whose size and signedness the header test compares.
SCALAR_TYPES = (C_INT, C_UINT, UINT32, SIZE_T, EVTCHN_PORT_T, XENEVTCHN_PORT_OR_ERROR_T,
                XEN_PFN_T, GRANT_REF_T, DOMID_T)

Prototype = tuple[CType, tuple[CType, ...]]  # (restype, argtypes)

EVTCHN_PROTOTYPES: dict[str, Prototype] = {
    "xenevtchn_open": (EVTCHN_HANDLE_P, (LOGGER_P, C_UINT)),
    "xenevtchn_close": (C_INT, (EVTCHN_HANDLE_P,)),
    "xenevtchn_fd": (C_INT, (EVTCHN_HANDLE_P,)),
    "xenevtchn_notify": (C_INT, (EVTCHN_HANDLE_P, EVTCHN_PORT_T)),
    "xenevtchn_bind_unbound_port": (XENEVTCHN_PORT_OR_ERROR_T, (EVTCHN_HANDLE_P, UINT32)),
    "xenevtchn_bind_interdomain": (XENEVTCHN_PORT_OR_ERROR_T,
                                   (EVTCHN_HANDLE_P, UINT32, EVTCHN_PORT_T)),
    "xenevtchn_unbind": (C_INT, (EVTCHN_HANDLE_P, EVTCHN_PORT_T)),
    "xenevtchn_pending": (XENEVTCHN_PORT_OR_ERROR_T, (EVTCHN_HANDLE_P,)),
    "xenevtchn_unmask": (C_INT, (EVTCHN_HANDLE_P, EVTCHN_PORT_T)),
}

GNTTAB_PROTOTYPES: dict[str, Prototype] = {
    "xengnttab_open": (GNTTAB_HANDLE_P, (LOGGER_P, C_UINT)),
    "xengnttab_close": (C_INT, (GNTTAB_HANDLE_P,)),
    "xengnttab_map_grant_ref": (VOID_P, (GNTTAB_HANDLE_P, UINT32, UINT32, C_INT)),
    "xengnttab_unmap": (C_INT, (GNTTAB_HANDLE_P, VOID_P, UINT32)),
}

FOREIGNMEMORY_PROTOTYPES: dict[str, Prototype] = {
    "xenforeignmemory_open": (FMEM_HANDLE_P, (LOGGER_P, C_UINT)),
    "xenforeignmemory_close": (C_INT, (FMEM_HANDLE_P,)),
    "xenforeignmemory_map": (VOID_P, (FMEM_HANDLE_P, UINT32, C_INT, SIZE_T, XEN_PFN_ARRAY,
                                      INT_ARRAY)),
    "xenforeignmemory_unmap": (C_INT, (FMEM_HANDLE_P, VOID_P, SIZE_T)),
}

#: libxenctrl is not ABI-stable (its soname carries the Xen version), and ``xc_domain_getinfo``
#: with ``xc_dominfo_t`` is gone after 4.17; it is only an optional source of domain state.
XENCTRL_PROTOTYPES: dict[str, Prototype] = {
    "xc_interface_open": (XC_INTERFACE_P, (LOGGER_P, LOGGER_P, C_UINT)),
    "xc_interface_close": (C_INT, (XC_INTERFACE_P,)),
    "xc_domain_getinfo": (C_INT, (XC_INTERFACE_P, UINT32, C_UINT, XC_DOMINFO_P)),
    # dom0's toolstack side of an RM VM (dmore_nova.xen.real.toolstack): XEN_DOMCTL_set_target
    "xc_domain_set_target": (C_INT, (XC_INTERFACE_P, UINT32, UINT32)),
}


class XcDominfoPrefix(ctypes.Structure):
    """The leading members of 4.17's ``xc_dominfo_t`` (xenctrl.h) that we read; the rest of the
    struct lands in the spare room of :data:`XC_DOMINFO_BUFSIZE`.  Offsets and the bit
    positions of the flags are compared with GCC's layout by the unit tests."""

    _fields_ = [
        ("domid", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("dying", ctypes.c_uint, 1),
        ("crashed", ctypes.c_uint, 1),
        ("shutdown", ctypes.c_uint, 1),
        ("paused", ctypes.c_uint, 1),
        ("blocked", ctypes.c_uint, 1),
        ("running", ctypes.c_uint, 1),
        ("hvm", ctypes.c_uint, 1),
        ("debugged", ctypes.c_uint, 1),
        ("xenstore", ctypes.c_uint, 1),
        ("hap", ctypes.c_uint, 1),
        ("shutdown_reason", ctypes.c_uint),
        ("nr_pages", ctypes.c_ulong),
        ("nr_outstanding_pages", ctypes.c_ulong),
        ("nr_shared_pages", ctypes.c_ulong),
        ("nr_paged_pages", ctypes.c_ulong),
        ("shared_info_frame", ctypes.c_ulong),
        ("cpu_time", ctypes.c_uint64),
        ("max_memkb", ctypes.c_ulong),
    ]


#: Bytes handed to ``xc_domain_getinfo`` for one ``xc_dominfo_t`` (the test checks it is enough).
XC_DOMINFO_BUFSIZE = 512


class XenLibrary:
    """One Xen library, loaded on first :meth:`get` with all its prototypes declared.

    :param name: the library's short name (``xenevtchn``), for messages.
    :param sonames: file names tried in order (the ABI-versioned one first).
    :param header: the header declaring ``prototypes`` (for the layout test).
    :param package: the Debian package providing it, for the error message.
    """

    def __init__(self, name: str, sonames: tuple[str, ...], header: str, package: str,
                 prototypes: Mapping[str, Prototype]) -> None:
        self.name = name
        self.sonames = sonames
        self.header = header
        self.package = package
        self.prototypes = dict(prototypes)
        self._lock = threading.Lock()
        self._cdll: ctypes.CDLL | None = None
        self._funcs: dict[str, Callable[..., object]] = {}

    def __repr__(self) -> str:
        return f"XenLibrary({self.name!r}, loaded={self._cdll is not None})"

    def get(self) -> ctypes.CDLL:
        """The loaded library; :class:`api.XenUnavailable` if it or a symbol is missing."""
        with self._lock:
            if self._cdll is None:
                self._cdll = self._load()
            return self._cdll

    def _load(self) -> ctypes.CDLL:
        errors = []
        for soname in self.sonames:
            try:
                lib = ctypes.CDLL(soname, use_errno=True)
            except OSError as e:
                errors.append(str(e))
                continue
            for fname, (restype, argtypes) in self.prototypes.items():
                try:
                    func = getattr(lib, fname)
                except AttributeError as e:
                    raise api.XenUnavailable(
                        errno.ENOSYS, f"{soname} has no {fname} (too old a Xen?)") from e
                func.restype = restype.ctype
                func.argtypes = [a.ctype for a in argtypes]
            return lib
        raise api.XenUnavailable(
            errno.ENOENT, f"lib{self.name} is not installed (tried {', '.join(self.sonames)}; "
                          f"Debian package {self.package}): {'; '.join(errors)}")

    def call(self, fname: str, *args: object) -> object:
        """Call ``fname`` (declared in :attr:`prototypes`); no errno handling here.

        The function object is looked up once: a key press costs a few of these calls, and
        in a PV domain under emulation every Python step is ~10x dearer than natively."""
        try:
            func = self._funcs[fname]
        except KeyError:
            if fname not in self.prototypes:
                raise KeyError(f"{fname} is not declared for lib{self.name}") from None
            func = self._funcs[fname] = getattr(self.get(), fname)
        return func(*args)


def evtchn_library(sonames: tuple[str, ...] = ("libxenevtchn.so.1",)) -> XenLibrary:
    return XenLibrary("xenevtchn", sonames, "xenevtchn.h", "libxenevtchn1", EVTCHN_PROTOTYPES)


def gnttab_library(sonames: tuple[str, ...] = ("libxengnttab.so.1",)) -> XenLibrary:
    return XenLibrary("xengnttab", sonames, "xengnttab.h", "libxengnttab1", GNTTAB_PROTOTYPES)


def foreignmemory_library(
        sonames: tuple[str, ...] = ("libxenforeignmemory.so.1",)) -> XenLibrary:
    return XenLibrary("xenforeignmemory", sonames, "xenforeignmemory.h",
                      "libxenforeignmemory1", FOREIGNMEMORY_PROTOTYPES)


def xenctrl_library(sonames: tuple[str, ...] = ("libxenctrl.so.4.17",)) -> XenLibrary:
    return XenLibrary("xenctrl", sonames, "xenctrl.h", "libxenmisc4.17", XENCTRL_PROTOTYPES)


#: The process-wide default instances (loading twice would only cost time, but why).
EVTCHN = evtchn_library()
GNTTAB = gnttab_library()
FOREIGNMEMORY = foreignmemory_library()
XENCTRL = xenctrl_library()

#: errno values from opening a device node that mean "no Xen here" rather than "Xen refused".
UNAVAILABLE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO})


def open_error(what: str, device: str, module: str, code: int) -> api.XenError:
    """The exception for a failed ``*_open``: :class:`api.XenUnavailable` when the device node is
    absent (not on Xen, or the kernel module is not loaded), :class:`api.XenError` otherwise."""
    reason = errno.errorcode.get(code, str(code))
    if code in UNAVAILABLE_ERRNOS:
        return api.XenUnavailable(
            code, f"{what} failed ({reason}): {device} is missing -- not running on Xen, or the "
                  f"{module} kernel module is not loaded")
    return api.XenError(code, f"{what} failed ({reason}) opening {device}")


def last_error(what: str) -> api.XenError:
    """The errno the last library call left, as a :class:`api.XenError`."""
    code = ctypes.get_errno() or errno.EIO
    return api.XenError(code, f"{what}: {errno.errorcode.get(code, code)}")


# -- guest memory as a memoryview --------------------------------------------------------------

_MAP_FIXED_NOREPLACE = 0x100000  # Linux >= 4.17; older kernels treat it as a hint
_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def _munmap(addr: int, size: int) -> None:
    _get_libc().munmap(addr, size)


class MappedPages(api.Mapping):
    """Pages some library mapped at ``addr``, exposed as ``mem`` (a ``memoryview`` of bytes).

    ``mem`` is read-only unless ``writable``: a Python write into a ``PROT_READ`` mapping would
    be a SIGSEGV, not an exception.

    Unmapping frees the address range; any view derived from ``mem`` (a slice, a numpy array)
    that is still alive would then point at nothing.  Callers must drop such views first, but a
    mistake must not crash the RM agent: if views are still alive at :meth:`unmap`, the range is
    refilled with anonymous zero pages (``MAP_FIXED_NOREPLACE``, so nothing mapped there in the
    meantime is touched) that live until the last view is gone, and a warning is logged.
    """

    def __init__(self, addr: int, npages: int, unmapper: Callable[[int, int], None], *,
                 writable: bool, what: str) -> None:
        if addr == 0 or npages <= 0:
            raise ValueError("empty mapping")
        self.addr = addr
        self.npages = npages
        self.size = npages * api.XC_PAGE_SIZE
        self.writable = writable
        self.what = what
        self._unmapper: Callable[[int, int], None] | None = unmapper
        self._array = (ctypes.c_ubyte * self.size).from_address(addr)
        self._base = memoryview(self._array)
        view = self._base.cast("B")
        self.mem = view if writable else view.toreadonly()

    def __repr__(self) -> str:
        state = "mapped" if self._unmapper else "unmapped"
        return f"MappedPages({self.what}, {self.npages} pages at {self.addr:#x}, {state})"

    @property
    def mapped(self) -> bool:
        return self._unmapper is not None

    def unmap(self) -> None:
        """Unmap (idempotent).  Raises :class:`api.XenError` if the library refuses; the pages
        then stay mapped and ``mem`` stays usable."""
        unmapper = self._unmapper
        if unmapper is None:
            return
        unmapper(self.addr, self.npages)  # raises on failure, leaving everything as it was
        self._unmapper = None
        array = self._array
        del self._array
        for view in (self.mem, self._base):
            # BufferError: something exported from the view itself (np.frombuffer(mem)) is
            # alive; the refcount check below sees it.
            with contextlib.suppress(BufferError):
                view.release()
        # References now: ``array`` + getrefcount's argument; more means live derived views.
        if sys.getrefcount(array) > 2:
            self._fill_hole(array)

    def _fill_hole(self, array: ctypes.Array) -> None:
        LOG.warning("%r: views of the mapping outlive unmap(); backing them with zero pages",
                    self)
        libc = _get_libc()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE
        got = libc.mmap(self.addr, self.size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if got in (None, ctypes.c_void_p(-1).value):
            LOG.error("%r: could not back the stale range (errno %d): stale views are unsafe",
                      self, ctypes.get_errno())
            return
        if got != self.addr:
            libc.munmap(got, self.size)
            LOG.error("%r: range was taken before it could be backed: stale views are unsafe",
                      self)
            return
        weakref.finalize(array, _munmap, self.addr, self.size)


class MappingHandle:
    """A lazily opened libxen handle that hands out :class:`MappedPages` (``xengnttab_handle``,
    ``xenforeignmemory_handle``): one place for open-on-first-use, unmap and close-with-unmap,
    which both libraries need identically (mappings must go before the handle does)."""

    #: Subclasses name their library's functions and the device/module an open needs.
    OPEN_FN = ""
    UNMAP_FN = ""
    CLOSE_FN = ""
    DEVICE = ""
    MODULE = ""
    WHAT = ""

    def __init__(self, lib: XenLibrary) -> None:
        self._lib = lib
        self._handle: int | None = None
        self._closed = False
        self._live: set[MappedPages] = set()

    def _h(self) -> int:
        if self._closed:
            raise api.XenError(errno.EBADF, f"{self.WHAT} handle is closed")
        if self._handle is None:
            ctypes.set_errno(0)
            handle = self._lib.call(self.OPEN_FN, None, 0)
            if not handle:
                raise open_error(self.OPEN_FN, self.DEVICE, self.MODULE,
                                 ctypes.get_errno() or errno.ENOENT)
            self._handle = handle
        return self._handle

    def _track(self, addr: int, npages: int, writable: bool, what: str) -> MappedPages:
        pages = MappedPages(addr, npages, self._unmapper, writable=writable, what=what)
        self._live.add(pages)
        return pages

    def _unmapper(self, addr: int, npages: int) -> None:
        ctypes.set_errno(0)
        if self._handle is None or self._lib.call(
                self.UNMAP_FN, self._handle, addr, npages) != 0:
            raise last_error(self.UNMAP_FN)
        self._live = {p for p in self._live if p.addr != addr}

    def close(self) -> None:
        if self._closed:
            return
        for pages in list(self._live):
            try:
                pages.unmap()
            except api.XenError:
                pass  # closing the handle releases what is left (or munmap at exit)
        self._live.clear()
        self._closed = True
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.call(self.CLOSE_FN, handle)
