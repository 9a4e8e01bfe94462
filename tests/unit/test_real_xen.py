"""RealXen and its ctypes layer, on a machine without Xen.

* Import and construction load no Xen library (checked in a fresh interpreter's memory map).
* Libraries absent (loader pointed at a name that does not exist) -> XenUnavailable at use.
* Libraries present (Debian's libxen-dev, installed here) but no /dev/xen -> the real ``*_open``
  calls fail and come back as XenUnavailable with ENOENT, naming the device and kernel module.
* Our ctypes prototypes are compiled against ``/usr/include/xen*.h`` with GCC: each function's
  spelled signature must be assignment-compatible with the header's declaration (-Werror), and
  each scalar type's size and signedness must equal its ctypes counterpart.
* The wrapper logic (errno plumbing, non-blocking pending, per-page map errors, validation,
  unmap safety) runs against a scripted library object standing in for libxen*: the seam is
  ``XenLibrary.call``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmore_nova.xen import api
from dmore_nova.xen.pyxs_store import PyxsXenStore
from dmore_nova.xen.real import libs
from dmore_nova.xen.real.evtchn import RealEventChannels
from dmore_nova.xen.real.foreignmemory import MAX_FOREIGN_MAP_PAGES, ForeignMemory
from dmore_nova.xen.real.gnttab import GrantTable
from dmore_nova.xen.real.xen import RealXen
from tests.unit.test_pyxs_store import SimDaemon

REPO = Path(__file__).resolve().parents[2]
REAL_DIR = REPO / "dmore_nova" / "xen" / "real"
PAGE = api.XC_PAGE_SIZE
STABLE_LIBS = (libs.evtchn_library(), libs.gnttab_library(), libs.foreignmemory_library())
ALL_LIBS = (*STABLE_LIBS, libs.xenctrl_library())


def _lib_installed(lib: libs.XenLibrary) -> bool:
    try:
        ctypes.CDLL(lib.sonames[0])
    except OSError:
        return False
    return True


LIBS_PRESENT = all(_lib_installed(lib) for lib in STABLE_LIBS)
XENCTRL_PRESENT = _lib_installed(ALL_LIBS[3])
HEADERS_PRESENT = all(Path("/usr/include", lib.header).exists() for lib in ALL_LIBS)


def missing(name: str) -> libs.XenLibrary:
    factory = {"evtchn": libs.evtchn_library, "gnttab": libs.gnttab_library,
               "foreignmemory": libs.foreignmemory_library, "xenctrl": libs.xenctrl_library}[name]
    return factory(("libxen-not-installed-here.so.99",))


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def sim(tmp_path) -> Iterator[SimDaemon]:  # noqa: ANN001
    d = SimDaemon(str(tmp_path))
    yield d
    d.close()


@pytest.fixture
def store(sim: SimDaemon) -> Iterator[PyxsXenStore]:
    s = PyxsXenStore(unix_socket_path=sim.path, request_timeout=5)
    yield s
    s.close()


# -- import and loading -------------------------------------------------------------------------

def test_import_and_construction_load_no_xen_library(sim: SimDaemon) -> None:
    code = textwrap.dedent(f"""
        from dmore_nova.xen.pyxs_store import PyxsXenStore
        from dmore_nova.xen.real.xen import RealXen
        from dmore_nova.xen.real import libs
        x = RealXen(PyxsXenStore(unix_socket_path={sim.path!r}))
        maps = open("/proc/self/maps").read()
        print(any(n in maps for n in ("libxenevtchn", "libxengnttab", "libxenforeignmemory")))
        print([l._cdll is None for l in (libs.EVTCHN, libs.GNTTAB, libs.FOREIGNMEMORY)])
        x.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    assert out[0] == "False"
    assert out[1] == "[True, True, True]"


def test_missing_libraries_fail_at_use_not_construction(store: PyxsXenStore) -> None:
    xen = RealXen(store, evtchn_lib=missing("evtchn"), gnttab_lib=missing("gnttab"),
                  foreignmemory_lib=missing("foreignmemory"), xenctrl_lib=missing("xenctrl"))
    with pytest.raises(api.XenUnavailable) as e:
        xen.event_channels()
    assert e.value.errno == errno.ENOENT
    assert "libxenevtchn" in str(e.value) and "libxenevtchn1" in str(e.value)
    with pytest.raises(api.XenUnavailable) as e:
        xen.map_grant(1, 8)
    assert "libxengnttab" in str(e.value)
    with pytest.raises(api.XenUnavailable) as e:
        xen.map_foreign(1, [0x1000])
    assert "libxenforeignmemory" in str(e.value)
    # xenstore-backed parts still work.
    store.write("/local/domain/4/name", "guest")
    assert xen.domain_info(4) == api.DomainInfo(domid=4, name="guest")
    xen.close()


def test_argument_validation_comes_before_any_library_use() -> None:
    fm = ForeignMemory(missing("foreignmemory"))
    for frames in ([], [0] * (MAX_FOREIGN_MAP_PAGES + 1), [-1], [1 << 64], ["12"]):
        with pytest.raises(api.XenError) as e:
            fm.map(1, frames)  # type: ignore[arg-type]
        assert e.value.errno == errno.EINVAL
        assert not isinstance(e.value, api.XenUnavailable)
    gt = GrantTable(missing("gnttab"))
    for domid, gref in ((-1, 1), (0x7FF0, 1), (1, -1), (1, 1 << 32)):
        with pytest.raises(api.XenError) as e:
            gt.map_grant_ref(domid, gref)
        assert e.value.errno == errno.EINVAL


def test_missing_symbol_is_unavailable_enosys() -> None:
    if not LIBS_PRESENT:
        pytest.skip(reason="libxenevtchn1 not installed")
    protos = dict(libs.EVTCHN_PROTOTYPES)
    protos["xenevtchn_from_the_future"] = (libs.C_INT, ())
    lib = libs.XenLibrary("xenevtchn", ("libxenevtchn.so.1",), "xenevtchn.h", "libxenevtchn1",
                          protos)
    with pytest.raises(api.XenUnavailable) as e:
        lib.get()
    assert e.value.errno == errno.ENOSYS
    assert "xenevtchn_from_the_future" in str(e.value)


@pytest.mark.skipif(not LIBS_PRESENT, reason="libxenevtchn1/libxengnttab1/libxenforeignmemory1 "
                                             "not installed")
@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="this machine runs on Xen")
def test_real_libraries_without_dev_xen_are_unavailable(store: PyxsXenStore) -> None:
    xen = RealXen(store, evtchn_lib=libs.evtchn_library(), gnttab_lib=libs.gnttab_library(),
                  foreignmemory_lib=libs.foreignmemory_library(),
                  xenctrl_lib=libs.xenctrl_library())
    cases: list[tuple[Callable[[], object], str, str]] = [
        (xen.event_channels, "/dev/xen/evtchn", "xen_evtchn"),
        (lambda: xen.map_grant(1, 8), "/dev/xen/gntdev", "xen_gntdev"),
        (lambda: xen.map_foreign(1, [0x1000]), "/dev/xen/privcmd", "xen_privcmd"),
    ]
    for call, device, module in cases:
        with pytest.raises(api.XenUnavailable) as e:
            call()
        assert e.value.errno == errno.ENOENT
        assert device in str(e.value) and module in str(e.value)
    # libxenctrl (optional) cannot open privcmd either: domain_info falls back to xenstore.
    store.write("/local/domain/6/name", "six")
    assert xen.domain_info(6) == api.DomainInfo(domid=6, name="six")
    assert xen._xc_failed
    xen.close()


@pytest.mark.skipif(not LIBS_PRESENT, reason="Xen libraries not installed")
def test_loaded_functions_carry_the_declared_prototypes() -> None:
    for template in ALL_LIBS if XENCTRL_PRESENT else STABLE_LIBS:
        lib = libs.XenLibrary(template.name, template.sonames, template.header,
                              template.package, template.prototypes)
        cdll = lib.get()
        for fname, (restype, argtypes) in lib.prototypes.items():
            func = getattr(cdll, fname)
            assert func.restype is restype.ctype, fname
            assert list(func.argtypes) == [a.ctype for a in argtypes], fname


def test_every_library_function_called_is_declared() -> None:
    declared = {**libs.EVTCHN_PROTOTYPES, **libs.GNTTAB_PROTOTYPES,
                **libs.FOREIGNMEMORY_PROTOTYPES, **libs.XENCTRL_PROTOTYPES}
    called = set()
    for src in REAL_DIR.glob("*.py"):
        called |= set(re.findall(r'\.call\(\s*"(\w+)"', src.read_text()))
    assert called, "no library calls found: the scan is broken"
    assert called <= set(declared), called - set(declared)


# -- prototypes against the C headers ------------------------------------------------------------

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or not HEADERS_PRESENT,
                               reason="needs gcc and libxen-dev headers")
# xenctrl.h pulls in domctl.h/sysctl.h, which are only exposed to the toolstack.
INCLUDES = ("#define __XEN_TOOLS__ 1\n#include <stdio.h>\n#include <stddef.h>\n"
            "#include <stdint.h>\n" + "".join(f"#include <{lib.header}>\n" for lib in ALL_LIBS))


@needs_gcc
def test_prototypes_compile_against_headers(tmp_path) -> None:  # noqa: ANN001
    lines = [INCLUDES]
    for lib in ALL_LIBS:
        for fname, (restype, argtypes) in lib.prototypes.items():
            args = ", ".join(a.c for a in argtypes) or "void"
            lines.append(f"{restype.c} (*check_{fname})({args}) = {fname};")
    src = tmp_path / "protos.c"
    src.write_text("\n".join(lines) + "\n")
    result = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-c", str(src), "-o",
                             str(tmp_path / "protos.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_gcc
def test_prototype_mismatch_would_be_caught(tmp_path) -> None:  # noqa: ANN001
    """The compile check above has teeth: a wrong argument type fails to compile."""
    src = tmp_path / "bad.c"
    src.write_text(INCLUDES + "int (*check)(xenevtchn_handle *, uint16_t) = xenevtchn_notify;\n")
    result = subprocess.run(["gcc", "-Werror", "-c", str(src), "-o", str(tmp_path / "bad.o")],
                            capture_output=True, text=True)
    assert result.returncode != 0


@needs_gcc
def test_scalar_types_match_ctypes(tmp_path) -> None:  # noqa: ANN001
    body = "\n".join(
        f'    printf("{t.c}=%zu,%d\\n", sizeof({t.c}), (int)(({t.c})-1 < ({t.c})0));'
        for t in libs.SCALAR_TYPES)
    src = tmp_path / "sizes.c"
    src.write_text(INCLUDES + f"int main(void) {{\n{body}\n    return 0;\n}}\n")
    exe = tmp_path / "sizes"
    subprocess.run(["gcc", "-Wall", "-Werror", str(src), "-o", str(exe)], check=True,
                   capture_output=True)
    measured = dict(line.split("=") for line in
                    subprocess.run([str(exe)], capture_output=True, text=True,
                                   check=True).stdout.split("\n") if line)
    assert set(measured) == {t.c for t in libs.SCALAR_TYPES}
    for t in libs.SCALAR_TYPES:
        size, signed = measured[t.c].split(",")
        assert ctypes.sizeof(t.ctype) == int(size), t.c  # type: ignore[arg-type]
        assert (t.ctype(-1).value < 0) == (signed == "1"), t.c  # type: ignore[misc, operator]


@needs_gcc
def test_xc_dominfo_prefix_matches_xenctrl_h(tmp_path) -> None:  # noqa: ANN001
    fields = [f[0] for f in libs.XcDominfoPrefix._fields_]
    flags = [f[0] for f in libs.XcDominfoPrefix._fields_ if len(f) == 3]
    plain = [f for f in fields if f not in flags]
    lines = [f'    printf("off {f} %zu\\n", offsetof(xc_dominfo_t, {f}));' for f in plain]
    for f in flags:
        lines.append(f"    memset(&d, 0, sizeof d); d.{f} = 1; dump(\"{f}\", &d);")
    src = tmp_path / "dominfo.c"
    src.write_text(INCLUDES + "#include <string.h>\n" + textwrap.dedent("""
        static void dump(const char *name, const xc_dominfo_t *d) {
            const unsigned char *p = (const unsigned char *)d;
            for (size_t i = 0; i < sizeof *d; i++)
                if (p[i]) printf("bit %s %zu %d\\n", name, i, __builtin_ctz(p[i]));
        }
        int main(void) {
            xc_dominfo_t d;
            printf("size %zu\\n", sizeof(xc_dominfo_t));
        """) + "\n".join(lines) + "\n    return 0;\n}\n")
    exe = tmp_path / "dominfo"
    build = subprocess.run(["gcc", "-Wall", "-Werror", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    measured = [line.split() for line in out.splitlines()]
    size = next(int(m[1]) for m in measured if m[0] == "size")
    assert size <= libs.XC_DOMINFO_BUFSIZE
    for kind, *rest in measured:
        if kind == "off":
            assert getattr(libs.XcDominfoPrefix, rest[0]).offset == int(rest[1]), rest[0]
        elif kind == "bit":
            ours = libs.XcDominfoPrefix()
            setattr(ours, rest[0], 1)
            raw = bytes(ours)
            byte = next(i for i, b in enumerate(raw) if b)
            assert (byte, (raw[byte] & -raw[byte]).bit_length() - 1) == \
                (int(rest[1]), int(rest[2])), rest[0]
    assert {m[1] for m in measured if m[0] == "bit"} == set(flags)


# -- a scripted stand-in for the libraries --------------------------------------------------------

class FakeLib:
    """Stands in for a :class:`libs.XenLibrary`: ``call`` dispatches to Python functions, which
    report failure the way the C functions do (return -1 / NULL and set errno)."""

    def __init__(self, funcs: dict[str, Callable[..., object]],
                 prototypes: dict[str, libs.Prototype]) -> None:
        assert set(funcs) <= set(prototypes), "fake implements an undeclared function"
        self.funcs = funcs
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def call(self, fname: str, *args: object) -> object:
        self.calls.append((fname, args))
        return self.funcs[fname](*args)


def fail(code: int, value: object = -1) -> object:
    ctypes.set_errno(code)
    return value


class FakeEvtchnDriver:
    """``/dev/xen/evtchn`` as a socket pair: pending ports are 4-byte words to read
    (libxenevtchn's Linux ``xenevtchn_pending`` is exactly such a ``read``), ports to unmask
    4-byte words written (``xenevtchn_unmask`` is such a ``write``); ``r`` is the handle's fd,
    ``w`` the driver's side."""

    HANDLE = 0x1234

    def __init__(self) -> None:
        a, b = socket.socketpair()
        self.r, self.w = a.detach(), b.detach()
        self.next_port = 10
        self.unmasked: list[int] = []
        self.notified: list[int] = []
        self.closed = False
        self.lib = FakeLib({
            "xenevtchn_open": lambda logger, flags: self.HANDLE,
            "xenevtchn_fd": lambda h: self.r,
            "xenevtchn_bind_interdomain": self.bind,
            "xenevtchn_notify": lambda h, port: self.notified.append(port) or 0,
            "xenevtchn_pending": self.pending,
            "xenevtchn_unmask": lambda h, port: self.unmasked.append(port) or 0,
            "xenevtchn_unbind": lambda h, port: 0 if port >= 10 else fail(errno.EINVAL),
            "xenevtchn_close": self.close,
        }, libs.EVTCHN_PROTOTYPES)

    def bind(self, h: int, domid: int, remote: int) -> int:
        if domid == 66:
            return fail(errno.ESRCH)  # type: ignore[return-value]
        self.next_port += 1
        return self.next_port

    def fire(self, port: int) -> None:
        os.write(self.w, port.to_bytes(4, sys.byteorder))

    def pending(self, h: int) -> int:
        try:
            data = os.read(self.r, 4)
        except OSError as e:
            return fail(e.errno)  # type: ignore[return-value]
        return int.from_bytes(data, sys.byteorder)

    def close(self, h: int) -> int:
        self.closed = True
        os.close(self.r)
        os.close(self.w)
        return 0


def test_event_channels_nonblocking_pending_and_errors() -> None:
    drv = FakeEvtchnDriver()
    ch = RealEventChannels(drv.lib)  # type: ignore[arg-type]
    assert ch.fileno() == drv.r
    assert fcntl.fcntl(drv.r, fcntl.F_GETFL) & os.O_NONBLOCK  # pending() must not block
    assert ch.pending() is None
    port = ch.bind_interdomain(3, 7)
    assert port == 11
    drv.fire(port)
    assert ch.pending() == port
    assert ch.pending() is None
    ch.unmask(port)
    ch.notify(port)
    assert drv.unmasked == [port] and drv.notified == [port]
    with pytest.raises(api.XenError) as e:
        ch.bind_interdomain(66, 1)
    assert e.value.errno == errno.ESRCH and "dom66" in str(e.value)
    with pytest.raises(api.XenError) as e:
        ch.unbind(3)
    assert e.value.errno == errno.EINVAL
    for bad in ((-1, 1), (0x7FF0, 1), (1, -1), (1, 1 << 32)):
        with pytest.raises(api.XenError) as e:
            ch.bind_interdomain(*bad)
        assert e.value.errno == errno.EINVAL
    ch.unbind(port)
    ch.close()
    ch.close()
    assert drv.closed
    assert [c for c, _ in drv.lib.calls].count("xenevtchn_close") == 1
    with pytest.raises(api.XenError) as e:
        ch.pending()
    assert e.value.errno == errno.EBADF


def test_event_channels_take_and_unmask_many_ports_in_one_call() -> None:
    """``pending_ports``/``unmask_ports`` read and write the evtchn device's array of
    ``evtchn_port_t`` directly (``evtchn_read``/``evtchn_write`` take any whole number):
    one system call per wakeup instead of two per port plus one for EAGAIN."""
    drv = FakeEvtchnDriver()
    ch = RealEventChannels(drv.lib)  # type: ignore[arg-type]
    assert ch.pending_ports() == []
    for port in (11, 12, 11, 40):
        drv.fire(port)
    assert ch.pending_ports(limit=3) == [11, 12, 11]   # firing order, duplicates kept
    assert ch.pending_ports() == [40]
    assert ch.pending_ports() == []
    ch.unmask_ports([11, 12, 40])
    ch.unmask_ports([])
    written = os.read(drv.w, 64)
    assert [int.from_bytes(written[i:i + 4], sys.byteorder)
            for i in range(0, len(written), 4)] == [11, 12, 40]
    assert [c for c, _ in drv.lib.calls if c in ("xenevtchn_pending", "xenevtchn_unmask")] == []
    with pytest.raises(ValueError):
        ch.pending_ports(limit=0)
    with pytest.raises(ValueError):
        ch.unmask_ports([11] * 1025)
    with pytest.raises(api.XenError) as e:
        ch.unmask_ports([11, 1 << 32])
    assert e.value.errno == errno.EINVAL
    os.write(drv.w, b"\x0b\x00")  # half a port: not what the device ever returns
    with pytest.raises(api.XenError) as e:
        ch.pending_ports()
    assert e.value.errno == errno.EPROTO
    ch.close()
    for call in (ch.pending_ports, lambda: ch.unmask_ports([11])):
        with pytest.raises(api.XenError) as e:
            call()
        assert e.value.errno == errno.EBADF


def test_event_channels_open_errors() -> None:
    for code, cls in ((errno.ENOENT, api.XenUnavailable), (errno.EACCES, api.XenError)):
        lib = FakeLib({"xenevtchn_open": lambda logger, flags, c=code: fail(c, None)},
                      libs.EVTCHN_PROTOTYPES)
        with pytest.raises(cls) as e:
            RealEventChannels(lib)  # type: ignore[arg-type]
        assert type(e.value) is cls
        assert e.value.errno == code


class AnonPages:
    """Hands out anonymous pages as if they were guest pages, and tracks what is mapped."""

    def __init__(self) -> None:
        self.libc = libs._get_libc()
        self.mapped: dict[int, int] = {}

    def map(self, npages: int, prot: int) -> int:
        addr = self.libc.mmap(None, npages * PAGE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              -1, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        self.mapped[addr] = npages
        return addr

    def unmap(self, addr: int, npages: int) -> int:
        assert self.mapped.pop(addr) == npages
        return self.libc.munmap(addr, npages * PAGE)


def test_foreign_map_success_and_per_page_errors() -> None:
    pages = AnonPages()
    bad_frames = {0x66: errno.EPERM, 0x77: -errno.EFAULT}  # privcmd may report either sign

    def fmap(h: int, dom: int, prot: int, n: int, arr: ctypes.Array, err: ctypes.Array) -> int:
        addr = pages.map(n, prot)
        for i in range(n):
            err[i] = bad_frames.get(arr[i], 0)
        return addr

    fm = ForeignMemory(FakeLib({  # type: ignore[arg-type]
        "xenforeignmemory_open": lambda logger, flags: 0x99,
        "xenforeignmemory_map": fmap,
        "xenforeignmemory_unmap": lambda h, addr, n: pages.unmap(addr, n),
        "xenforeignmemory_close": lambda h: 0,
    }, libs.FOREIGNMEMORY_PROTOTYPES))
    m = fm.map(5, [0x10, 0x11, 0x12], writable=True)
    assert len(m.mem) == 3 * PAGE and m.mem.format == "B" and not m.mem.readonly
    m.mem[3 * PAGE - 1] = 0xAB
    assert m.mem[3 * PAGE - 1] == 0xAB
    ro = fm.map(5, [0x20], writable=False)
    assert ro.mem.readonly  # a Python write into PROT_READ would be a SIGSEGV
    with pytest.raises(TypeError):
        ro.mem[0] = 1
    for frames, code in (([0x10, 0x66, 0x12], errno.EPERM), ([0x77], errno.EFAULT)):
        before = dict(pages.mapped)
        with pytest.raises(api.XenError) as e:
            fm.map(5, frames)
        assert e.value.errno == code
        assert pages.mapped == before  # the partial mapping was undone
    m.unmap()
    m.unmap()
    with pytest.raises(ValueError):
        m.mem[0]  # released, not a dangling pointer
    fm.close()  # unmaps what is still mapped (ro)
    assert pages.mapped == {}
    with pytest.raises(api.XenError) as e:
        fm.map(5, [1])
    assert e.value.errno == errno.EBADF


def test_foreign_map_total_failure_reports_errno() -> None:
    fm = ForeignMemory(FakeLib({  # type: ignore[arg-type]
        "xenforeignmemory_open": lambda logger, flags: 0x99,
        "xenforeignmemory_map": lambda *a: fail(errno.ENOMEM, None),
    }, libs.FOREIGNMEMORY_PROTOTYPES))
    with pytest.raises(api.XenError) as e:
        fm.map(5, [1, 2])
    assert e.value.errno == errno.ENOMEM


def test_grant_map_errors_unmap_and_close() -> None:
    pages = AnonPages()

    def gmap(h: int, domid: int, ref: int, prot: int) -> int | None:
        if ref == 13:
            return fail(errno.EPERM, None)  # type: ignore[return-value]
        assert prot == (mmap.PROT_READ | mmap.PROT_WRITE)
        return pages.map(1, prot)

    closed = []
    gt = GrantTable(FakeLib({  # type: ignore[arg-type]
        "xengnttab_open": lambda logger, flags: 0x77,
        "xengnttab_map_grant_ref": gmap,
        "xengnttab_unmap": lambda h, addr, n: pages.unmap(addr, n),
        "xengnttab_close": lambda h: closed.append(h) or 0,
    }, libs.GNTTAB_PROTOTYPES))
    with pytest.raises(api.XenError) as e:
        gt.map_grant_ref(3, 13)
    assert e.value.errno == errno.EPERM and "gref 13" in str(e.value)
    a = gt.map_grant_ref(3, 8)
    b = gt.map_grant_ref(3, 9)
    with a:
        a.mem[0:4] = b"\x01\x02\x03\x04"
        assert bytes(a.mem[0:4]) == b"\x01\x02\x03\x04"
    assert not a.mapped and len(pages.mapped) == 1
    gt.close()
    assert not b.mapped and pages.mapped == {} and closed == [0x77]


def test_failed_unmap_keeps_mapping_usable() -> None:
    pages = AnonPages()
    addr = pages.map(1, mmap.PROT_READ | mmap.PROT_WRITE)

    def refuse(a: int, n: int) -> None:
        raise api.XenError(errno.EINVAL, "refused")

    m = libs.MappedPages(addr, 1, refuse, writable=True, what="test")
    with pytest.raises(api.XenError):
        m.unmap()
    m.mem[0] = 7
    assert m.mapped and m.mem[0] == 7
    pages.unmap(addr, 1)


def test_stale_views_after_unmap_do_not_crash() -> None:
    """A slice kept past unmap() must read zeros, not segfault: run in a child process so a
    crash fails this test instead of killing pytest."""
    code = textwrap.dedent("""
        import ctypes, gc, mmap
        from dmore_nova.xen.real import libs
        libc = libs._get_libc()
        size = 2 * 4096
        addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        m = libs.MappedPages(addr, 2, lambda a, n: libc.munmap(a, n * 4096), writable=True,
                             what="child")
        m.mem[:] = b"\\x5a" * size
        stale = m.mem[4096:4100]
        m.unmap()
        print(bytes(stale))              # zeros from the backing pages, no SIGSEGV
        def mapped(a):
            for line in open("/proc/self/maps"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= a < hi:
                    return True
            return False
        print(mapped(addr) and mapped(addr + size - 1))
        del stale
        gc.collect()
        print(mapped(addr) or mapped(addr + size - 1))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout.split("\n")
    assert out[0] == repr(b"\0\0\0\0")
    assert out[1] == "True"   # backing pages present while the view lives
    assert out[2] == "False"  # and released with the last view


# -- RealXen over the simulated xenstore ---------------------------------------------------------

def test_domid_from_xenstore(sim: SimDaemon, store: PyxsXenStore, tmp_path) -> None:  # noqa: ANN001
    caps = tmp_path / "capabilities"
    # dom0 socket: relative "domid" is /local/domain/0/domid.
    xen0 = RealXen(store, capabilities_path=str(caps))
    with pytest.raises(api.XenError) as e:
        xen0.domid  # noqa: B018  not a control domain, and no node
    assert e.value.errno == errno.ENOENT
    caps.write_text("control_d\n")
    assert xen0.domid == 0
    store.write("/local/domain/0/domid", "0")
    assert xen0.domid == 0
    # A domU (the sim's per-domain socket): its own domid, re-read on every access.
    sim.call(lambda: sim.server.introduce_domain(12))
    dom_sock = str(tmp_path / "dom12.sock")
    sim.run(sim.server.serve_domain_socket(12, dom_sock))
    store.write("/local/domain/12/domid", "12")
    store.set_perms("/local/domain/12/domid", ["n0", "r12"])  # as libxl: guest may read
    with PyxsXenStore(unix_socket_path=dom_sock) as guest_store:
        xen = RealXen(guest_store, capabilities_path=str(tmp_path / "none"))
        assert xen.domid == 12
        store.write("/local/domain/12/domid", "garbage")
        with pytest.raises(api.XenError) as e:
            xen.domid  # noqa: B018
        assert e.value.errno == errno.EINVAL
        store.write("/local/domain/12/domid", "32752")  # DOMID_FIRST_RESERVED
        with pytest.raises(api.XenError) as e:
            xen.domid  # noqa: B018
        assert e.value.errno == errno.EINVAL


def test_domain_info_from_xenstore(store: PyxsXenStore) -> None:
    xen = RealXen(store, evtchn_lib=missing("evtchn"), gnttab_lib=missing("gnttab"),
                  foreignmemory_lib=missing("foreignmemory"), xenctrl_lib=missing("xenctrl"))
    store.write("/local/domain/3/name", "guest-3")
    store.write("/local/domain/4/device", "")  # being built: no name yet
    assert xen.domain_info(3) == api.DomainInfo(domid=3, name="guest-3")
    assert xen.domain_info(4) == api.DomainInfo(domid=4, name="")
    assert xen.domain_info(5) is None
    with pytest.raises(api.XenError) as e:
        xen.domain_info(0x7FF0)
    assert e.value.errno == errno.EINVAL


def test_domain_info_uses_hypervisor_state_when_allowed(store: PyxsXenStore) -> None:
    domains = {3: dict(paused=1, dying=0, max_memkb=262144), 8: dict(paused=0, dying=1,
                                                                      max_memkb=4096)}

    def getinfo(xc: int, first: int, max_doms: int, buf: ctypes.Array) -> int:
        assert max_doms == 1
        if first == 9:
            return fail(errno.EPERM)  # type: ignore[return-value]
        up = sorted(d for d in domains if d >= first)
        if not up:
            return 0
        info = libs.XcDominfoPrefix(domid=up[0], **domains[up[0]])
        ctypes.memmove(buf, ctypes.addressof(info), ctypes.sizeof(info))
        return 1

    closed = []
    xc = FakeLib({"xc_interface_open": lambda a, b, c: 0x5C,
                  "xc_domain_getinfo": getinfo,
                  "xc_interface_close": lambda h: closed.append(h) or 0},
                 libs.XENCTRL_PROTOTYPES)
    xen = RealXen(store, evtchn_lib=missing("evtchn"), gnttab_lib=missing("gnttab"),
                  foreignmemory_lib=missing("foreignmemory"), xenctrl_lib=xc)  # type: ignore
    store.write("/local/domain/3/name", "paused-guest")
    store.write("/local/domain/5/name", "stale")  # Xen: domain 5 is gone (next is 8)
    store.write("/local/domain/9/name", "not-ours")
    assert xen.domain_info(3) == api.DomainInfo(3, "paused-guest", dying=False, paused=True,
                                                max_pages=65536)
    assert xen.domain_info(8) == api.DomainInfo(8, "", dying=True, paused=False, max_pages=1024)
    assert xen.domain_info(5) is None
    assert xen.domain_info(9) == api.DomainInfo(9, "not-ours")  # EPERM: xenstore only
    assert [c for c, _ in xc.calls].count("xc_interface_open") == 1
    xen.close()
    assert closed == [0x5C]
