"""Unmodified clients of the real xenstored against the sim daemon, over real unix sockets:
pyxs 0.4.1 (as installed) and Xen's own C client library, libxenstore (Debian's libxenstore4,
driven through ctypes)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pyxs
from pyxs.exceptions import PyXSError

from dmore_nova.xen.sim.xenstore import Quotas, Xenstore
from dmore_nova.xen.sim.xenstored import XenstoreServer

TIMEOUT = 5.0


class LoopThread:
    """An asyncio loop in a daemon thread (the daemon's), driven from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="sim-xenstored")
        self.thread.start()

    def run(self, coro, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        async def _call() -> Any:
            return fn()
        return self.run(_call(), timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class SimXenstored:
    """The sim daemon on a background loop; ``on_loop`` runs supervisor calls on that loop."""

    def __init__(self, directory: str, store: Xenstore | None = None) -> None:
        self.dir = directory
        self.lt = LoopThread()
        self.server = XenstoreServer(store)
        self.path = os.path.join(directory, "socket")
        self.lt.run(self.server.serve(self.path))

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        return self.lt.call(fn)

    def domain_socket(self, domid: int) -> str:
        path = os.path.join(self.dir, f"dom{domid}.sock")

        def setup() -> None:
            if not self.server.store.is_domain_introduced(domid):
                self.server.introduce_domain(domid)
        self.on_loop(setup)
        self.lt.run(self.server.serve_domain_socket(domid, path))
        return path

    def client(self, path: str | None = None) -> pyxs.Client:
        return pyxs.Client(unix_socket_path=path or self.path)

    def stop(self) -> None:
        try:
            self.lt.run(self.server.close())
        finally:
            self.lt.stop()


@pytest.fixture
def xsd(tmp_path) -> Iterator[SimXenstored]:
    d = SimXenstored(str(tmp_path))
    yield d
    d.stop()


def next_event(it: Iterator, timeout: float = TIMEOUT):
    """``next(monitor.wait())`` with a deadline, so a missing event fails instead of hanging."""
    box: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: box.put(next(it)), daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no watch event within {timeout}s") from None


def wait_until(pred: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# pyxs


def test_pyxs_basic_operations(xsd):
    with xsd.client() as c:
        c.write(b"/vm/1/name", b"guest")
        c[b"/vm/1/memory"] = b"512"
        assert c.read(b"/vm/1/name") == b"guest"
        assert c[b"/vm/1/memory"] == b"512"
        assert c.read(b"/vm/1/missing", default=b"dflt") == b"dflt"
        assert sorted(c.list(b"/vm/1")) == [b"memory", b"name"]
        assert c.list(b"/tool/xenstored") == []
        assert c.exists(b"/vm/1") and not c.exists(b"/vm/2")
        c.mkdir(b"/vm/2/device")
        assert c.read(b"/vm/2/device") == b""
        assert c.get_perms(b"/vm/1") == [b"n0"]
        c.set_perms(b"/vm/1", [b"n0", b"r5", b"b6"])
        assert c.get_perms(b"/vm/1") == [b"n0", b"r5", b"b6"]
        assert c.get_perms(b"/vm/1/name") == [b"n0"]   # created before the chmod
        c.delete(b"/vm/1")
        assert not c.exists(b"/vm/1/name")
        c.delete(b"/vm/1")                             # missing node, existing parent: fine
        with pytest.raises(PyXSError) as ei:
            c.delete(b"/nothing/here")
        assert ei.value.args[0] == errno.ENOENT
        with pytest.raises(PyXSError) as ei:
            c.read(b"/vm/1")
        assert ei.value.args[0] == errno.ENOENT
        assert c.get_domain_path(7) == b"/local/domain/7"
        assert c.is_domain_introduced(0) is True
        assert c.is_domain_introduced(7) is False
        c.write(b"relative/key", b"v")                 # dom0 socket: /local/domain/0
        assert c.read(b"/local/domain/0/relative/key") == b"v"
        walked = [p for p, _v, _k in c.walk(b"/vm")]
        assert walked == [b"/vm", b"/vm/2", b"/vm/2/device"]
        # the daemon state agrees
        assert xsd.on_loop(lambda: xsd.server.store.node("/vm/2/device")) is not None


def test_pyxs_monitor_watch_events(xsd):
    with xsd.client() as c, xsd.client() as writer:
        m = c.monitor()
        m.watch(b"/watched", b"tok")
        events = m.wait()
        assert next_event(events) == (b"/watched", b"tok")      # fired on registration
        writer.write(b"/watched/a", b"1")
        assert next_event(events) == (b"/watched/a", b"tok")
        writer.write(b"/elsewhere", b"x")                         # not reported
        writer.write(b"/watched", b"2")
        assert next_event(events) == (b"/watched", b"tok")
        writer.write(b"/watched/a/b/c", b"3")
        assert next_event(events) == (b"/watched/a/b/c", b"tok")
        writer.delete(b"/watched/a")
        assert next_event(events) == (b"/watched/a", b"tok")
        m.watch(b"@introduceDomain", b"intro")
        assert next_event(events) == (b"@introduceDomain", b"intro")
        writer.introduce_domain(9, 1234, 5)
        assert next_event(events) == (b"@introduceDomain", b"intro")
        m.unwatch(b"/watched", b"tok")
        writer.write(b"/watched/after", b"x")
        writer.introduce_domain(10, 1234, 5)
        assert next_event(events) == (b"@introduceDomain", b"intro")   # not /watched/after
        m.close()
        assert m.watched == set()


def test_pyxs_monitor_context_manager_unwatches(xsd):
    with xsd.client() as c:
        with c.monitor() as m:
            m.watch(b"/cm", b"t")
            assert next_event(m.wait()) == (b"/cm", b"t")
        assert xsd.on_loop(lambda: sum(len(x.watches) for x in xsd.server.store.connections)) \
            == 0


def test_pyxs_transactions_commit_conflict_and_retry(xsd):
    with xsd.client() as a, xsd.client() as b:
        a.write(b"/counter", b"0")
        a.transaction()
        value = int(a.read(b"/counter"))
        a.write(b"/counter", str(value + 1).encode())
        assert b.read(b"/counter") == b"0"             # isolated until commit
        assert a.commit() is True
        assert b.read(b"/counter") == b"1"

        # conflict: b changes what a's transaction read
        a.transaction()
        value = int(a.read(b"/counter"))
        b.write(b"/counter", b"100")
        a.write(b"/counter", str(value + 1).encode())
        assert a.commit() is False                     # EAGAIN -> False, tx gone
        assert a.tx_id == 0
        assert b.read(b"/counter") == b"100"
        # the retry sees the new value and succeeds
        a.transaction()
        value = int(a.read(b"/counter"))
        a.write(b"/counter", str(value + 1).encode())
        assert a.commit() is True
        assert a.read(b"/counter") == b"101"

        # rollback
        a.transaction()
        a.write(b"/counter", b"rolled back")
        a.rollback()
        assert a.read(b"/counter") == b"101"


def test_pyxs_retry_loop_with_concurrent_incrementers(xsd):
    """Two clients increment one counter in transactions from two threads: with retries on
    commit() == False no increment is lost."""
    with xsd.client() as c:
        c.write(b"/shared/n", b"0")
    n_each = 25

    def incrementer() -> None:
        with xsd.client() as cl:
            for _ in range(n_each):
                while True:
                    cl.transaction()
                    v = int(cl.read(b"/shared/n"))
                    cl.write(b"/shared/n", str(v + 1).encode())
                    if cl.commit():
                        break

    threads = [threading.Thread(target=incrementer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    with xsd.client() as c:
        assert c.read(b"/shared/n") == str(2 * n_each).encode()


def test_pyxs_domu_gets_eacces_and_works_in_its_home(xsd):
    with xsd.client() as dom0:
        dom0.write(b"/secret", b"s")
        dom0.mkdir(b"/local/domain/5")  # (pyxs cannot write an empty value)
        dom0.set_perms(b"/local/domain/5", [b"n5", b"r0"])
    path = xsd.domain_socket(5)
    with xsd.client(path) as domu:
        with pytest.raises(PyXSError) as ei:
            domu.read(b"/secret")
        assert ei.value.args[0] == errno.EACCES
        with pytest.raises(PyXSError) as ei:
            domu.write(b"/secret", b"mine now")
        assert ei.value.args[0] == errno.EACCES
        with pytest.raises(PyXSError) as ei:
            domu.introduce_domain(8, 1, 1)             # privileged op
        assert ei.value.args[0] == errno.EACCES
        domu.write(b"device/vkbd/0/state", b"1")       # relative: /local/domain/5/...
        assert domu.read(b"/local/domain/5/device/vkbd/0/state") == b"1"
        assert domu.get_perms(b"device/vkbd/0/state") == [b"n5", b"r0"]
        with pytest.raises(PyXSError) as ei:
            domu.read(b"/local/domain/6/nothing")      # parent not readable: EACCES, not ENOENT
        assert ei.value.args[0] == errno.EACCES
    with xsd.client() as dom0:
        assert dom0.read(b"/secret") == b"s"


def test_two_clients_concurrently_with_a_watcher(xsd):
    n = 60
    with xsd.client() as watcher:
        m = watcher.monitor()
        m.watch(b"/conc", b"w")
        events = m.wait()
        assert next_event(events) == (b"/conc", b"w")

        def writer(tag: bytes) -> None:
            with xsd.client() as cl:
                for i in range(n):
                    cl.write(b"/conc/" + tag + b"/" + str(i).encode(), tag)

        threads = [threading.Thread(target=writer, args=(t,)) for t in (b"a", b"b")]
        for t in threads:
            t.start()
        seen = [next_event(events) for _ in range(2 * n)]
        for t in threads:
            t.join(30)
        assert sorted(p for p, _ in seen) == sorted(
            b"/conc/" + t + b"/" + str(i).encode() for t in (b"a", b"b") for i in range(n))
        # each writer's events arrive in its own order
        for tag in (b"a", b"b"):
            mine = [int(p.rsplit(b"/", 1)[1]) for p, _ in seen if p.split(b"/")[2] == tag]
            assert mine == list(range(n))
        assert sorted(watcher.list(b"/conc/a"), key=int) == [str(i).encode() for i in range(n)]


# pyxs's router thread dies with ConnectionError when the daemon cuts the domain off: expected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("how", ["supervisor-api", "xs-release"])
def test_release_domain_disconnects_it_and_fires_release(xsd, how):
    with xsd.client() as dom0:
        dom0.mkdir(b"/local/domain/5")  # (pyxs cannot write an empty value)
        dom0.set_perms(b"/local/domain/5", [b"n5", b"r0"])
        m = dom0.monitor()
        m.watch(b"@releaseDomain", b"rel")
        events = m.wait()
        assert next_event(events) == (b"@releaseDomain", b"rel")
        path = xsd.domain_socket(5)
        domu = xsd.client(path)
        domu.connect()
        domu.write(b"device/x", b"1")
        if how == "supervisor-api":
            xsd.on_loop(lambda: xsd.server.release_domain(5))
        else:
            dom0.SU = True        # pyxs only sends RELEASE when it thinks it runs in dom0
            dom0.release_domain(5)
        assert next_event(events) == (b"@releaseDomain", b"rel")
        assert not dom0.exists(b"/local/domain/5")      # owned by 5: deleted
        assert dom0.is_domain_introduced(5) is False
        wait_until(lambda: not domu.router.thread.is_alive(), "the domU client to be cut off")
        assert not os.path.exists(path)
        domu.close()


def test_malformed_client_is_dropped_others_go_on(xsd, caplog):
    caplog.set_level(logging.WARNING, logger="dmore_nova.xen.sim.xenstored")
    with xsd.client() as good:
        good.write(b"/ok", b"1")
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.settimeout(TIMEOUT)
        bad.connect(xsd.path)
        # a well-formed request first: it is answered
        bad.sendall(struct.pack("<IIII", 2, 1, 0, 4) + b"/ok\x00")
        assert bad.recv(100) == struct.pack("<IIII", 2, 1, 0, 1) + b"1"
        # then a header announcing more than XENSTORE_PAYLOAD_MAX: dropped
        bad.sendall(struct.pack("<IIII", 11, 2, 0, 5000) + b"x" * 100)
        assert bad.recv(100) == b""
        bad.close()
        assert any("protocol error" in r.getMessage() for r in caplog.records)
        assert good.read(b"/ok") == b"1"                 # the good client is unaffected
        # a client vanishing mid-message is cleaned up too
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        half.connect(xsd.path)
        half.sendall(struct.pack("<IIII", 4, 1, 0, 10) + b"/ok\x00")
        half.close()
        wait_until(lambda: xsd.on_loop(lambda: len(xsd.server.store.connections)) == 1,
                   "the half-sent client to be forgotten")
        good.write(b"/ok", b"2")
        assert good.read(b"/ok") == b"2"


def test_unknown_operation_gets_enosys_over_the_socket(xsd):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(xsd.path)
    s.sendall(struct.pack("<IIII", 128, 42, 0, 0))      # pyxs's Op.RESTRICT
    assert s.recv(100) == struct.pack("<IIII", 16, 42, 0, 7) + b"ENOSYS\x00"
    s.close()


def test_quota_error_reaches_a_pyxs_domu(tmp_path):
    d = SimXenstored(str(tmp_path), Xenstore(Quotas(max_watches_per_domain=2)))
    try:
        path = d.domain_socket(5)
        with d.client(path) as domu:
            m = domu.monitor()
            m.watch(b"/a", b"t")
            m.watch(b"/b", b"t")
            with pytest.raises(PyXSError) as ei:
                m.watch(b"/c", b"t")
            assert ei.value.args[0] == errno.E2BIG
    finally:
        d.stop()


# ---------------------------------------------------------------------------------------------
# Xen's C client library


class XsPermissions(ctypes.Structure):
    """``struct xs_permissions`` of xenstore_lib.h (4.17): id first, then the perm bits."""
    _fields_ = [("id", ctypes.c_uint), ("perms", ctypes.c_uint)]


def _libxenstore():
    name = ctypes.util.find_library("xenstore")
    if name is None:
        pytest.skip(reason="libxenstore (libxenstore4) not installed")
    lib = ctypes.CDLL(name, use_errno=True)
    vp, u32, cp = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p
    puint = ctypes.POINTER(ctypes.c_uint)
    lib.xs_open.restype, lib.xs_open.argtypes = vp, [ctypes.c_ulong]
    lib.xs_close.argtypes = [vp]
    lib.xs_read.restype, lib.xs_read.argtypes = vp, [vp, u32, cp, puint]
    lib.xs_write.restype = ctypes.c_bool
    lib.xs_write.argtypes = [vp, u32, cp, ctypes.c_char_p, ctypes.c_uint]
    lib.xs_directory.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.xs_directory.argtypes = [vp, u32, cp, puint]
    lib.xs_transaction_start.restype, lib.xs_transaction_start.argtypes = u32, [vp]
    lib.xs_transaction_end.restype = ctypes.c_bool
    lib.xs_transaction_end.argtypes = [vp, u32, ctypes.c_bool]
    lib.xs_watch.restype, lib.xs_watch.argtypes = ctypes.c_bool, [vp, cp, cp]
    lib.xs_read_watch.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.xs_read_watch.argtypes = [vp, puint]
    lib.xs_fileno.restype, lib.xs_fileno.argtypes = ctypes.c_int, [vp]
    lib.xs_get_permissions.restype = ctypes.POINTER(XsPermissions)
    lib.xs_get_permissions.argtypes = [vp, u32, cp, puint]
    lib.xs_set_permissions.restype = ctypes.c_bool
    lib.xs_set_permissions.argtypes = [vp, u32, cp, ctypes.POINTER(XsPermissions), ctypes.c_uint]
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [vp]
    return lib, libc


def test_libxenstore_c_client(xsd, monkeypatch):
    lib, libc = _libxenstore()
    monkeypatch.setenv("XENSTORED_PATH", xsd.path)   # xs_daemon_socket() honours it
    h = lib.xs_open(0)
    assert h, f"xs_open failed: errno {ctypes.get_errno()}"
    try:
        assert lib.xs_write(h, 0, b"/c/lib", b"from C", 6)
        n = ctypes.c_uint()
        p = lib.xs_read(h, 0, b"/c/lib", ctypes.byref(n))
        assert ctypes.string_at(p, n.value) == b"from C"
        libc.free(p)
        assert not lib.xs_read(h, 0, b"/c/missing", ctypes.byref(n))
        assert ctypes.get_errno() == errno.ENOENT

        # a directory too big for one XS_DIRECTORY reply: libxenstore falls back to
        # XS_DIRECTORY_PART on E2BIG
        names = [f"entry-with-a-long-name-{i:04d}".encode() for i in range(250)]
        for name in names:
            assert lib.xs_write(h, 0, b"/c/big/" + name, b"", 0)
        vec = lib.xs_directory(h, 0, b"/c/big", ctypes.byref(n))
        assert vec, f"xs_directory failed: errno {ctypes.get_errno()}"
        assert [vec[i] for i in range(n.value)] == names
        libc.free(vec)

        perms = (XsPermissions * 2)((0, 0), (5, 1))        # n0 r5
        assert lib.xs_set_permissions(h, 0, b"/c/lib", perms, 2)
        with xsd.client() as other:
            assert other.get_perms(b"/c/lib") == [b"n0", b"r5"]
        pp = lib.xs_get_permissions(h, 0, b"/c/lib", ctypes.byref(n))
        assert [(pp[i].id, pp[i].perms) for i in range(n.value)] == [(0, 0), (5, 1)]
        libc.free(pp)

        # transactions, including a conflict (EAGAIN) caused by another client
        t = lib.xs_transaction_start(h)
        assert t
        assert lib.xs_write(h, t, b"/c/tx", b"1", 1)
        assert lib.xs_transaction_end(h, t, False)
        t = lib.xs_transaction_start(h)
        p = lib.xs_read(h, t, b"/c/tx", ctypes.byref(n))
        libc.free(p)
        with xsd.client() as other:
            other.write(b"/c/tx", b"other")
        assert lib.xs_write(h, t, b"/c/tx", b"2", 1)
        assert not lib.xs_transaction_end(h, t, False)
        assert ctypes.get_errno() == errno.EAGAIN

        # a watch: the registration event, then a change made through pyxs
        assert lib.xs_watch(h, b"/c/w", b"ctoken")
        got = []
        for _ in range(2):
            vec = lib.xs_read_watch(h, ctypes.byref(n))
            assert vec and n.value == 2
            got.append((vec[0], vec[1]))
            libc.free(vec)
            if len(got) == 1:
                with xsd.client() as other:
                    other.write(b"/c/w/x", b"1")
        assert got == [(b"/c/w", b"ctoken"), (b"/c/w/x", b"ctoken")]
    finally:
        lib.xs_close(h)
