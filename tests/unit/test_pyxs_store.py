"""PyxsXenStore (pyxs 0.4.1 + our request/watch layer) and the xenbus-device connection.

Most tests run the adapter against the project's simulated xenstored
(:class:`dmore_nova.xen.sim.xenstored.XenstoreServer`, C xenstored semantics) on a unix socket,
served from an asyncio loop in a background thread -- the adapter is a blocking client, as it is
in the RM agent.  Behaviour the sim cannot produce on demand (a daemon that never answers, an
unknown error name, an old kernel's zeroed WATCH reply) comes from small scripted peers.

The xenbus connection is exercised over a pseudo-terminal in raw mode: like
``/dev/xen/xenbus`` it is a character device opened by path, read and written as a byte stream;
the "kernel" on the master side answers as ``xenbus_dev_frontend.c`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
import tty
from collections.abc import Callable, Iterator

import pytest
from pyxs import Client
from pyxs._internal import Op, Packet
from pyxs.connection import XenBusConnection
from pyxs.exceptions import PyXSError

from dmore_nova.xen import api
from dmore_nova.xen.pyxs_store import MAX_EVENTS_PER_READ, PyxsXenStore, _SignallingQueue
from dmore_nova.xen.real.xenbus_conn import XENSTORE_PAYLOAD_MAX, XenBusDeviceConnection
from dmore_nova.xen.sim.xenstored import XenstoreServer

HDR = struct.Struct("<IIII")


# -- fixtures ------------------------------------------------------------------------------------

class SimDaemon:
    """The sim xenstored on its own loop thread."""

    def __init__(self, tmp: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = XenstoreServer()
        self.path = os.path.join(tmp, "xenstored.sock")
        self.run(self.server.serve(self.path))

    def run(self, coro):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[], object]) -> object:
        async def wrapper() -> object:
            return fn()
        return self.run(wrapper())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def sim(tmp_path) -> Iterator[SimDaemon]:  # noqa: ANN001
    d = SimDaemon(str(tmp_path))
    yield d
    d.close()


@pytest.fixture
def xs(sim: SimDaemon) -> Iterator[PyxsXenStore]:
    store = PyxsXenStore(unix_socket_path=sim.path, request_timeout=5)
    yield store
    store.close()


def wait_events(store: PyxsXenStore, timeout: float = 2.0) -> list[tuple[str, str]]:
    """Block on the watch fd the way an event loop would, then read."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        readable, _, _ = select.select([store.watch_fileno()], [], [], left)
        if readable:
            events = store.read_watch_events()
            if events:
                return events


def fd_readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


# -- plain operations ----------------------------------------------------------------------------

def test_read_missing_is_none_and_write_roundtrips_empty_and_binary(xs: PyxsXenStore) -> None:
    assert xs.read("/local/domain/0/nonexistent") is None
    xs.write("/test/empty", "")  # pyxs's own Client.write refuses an empty value
    xs.write("/test/bin", b"\xff\x00tail")  # and bytes >= 0x80
    xs.write("/test/text", "hello")
    assert xs.read("/test/empty") == b""
    assert xs.read("/test/bin") == b"\xff\x00tail"
    assert xs.read("/test/text") == b"hello"
    assert sorted(xs.directory("/test")) == ["bin", "empty", "text"]


def test_directory_missing_is_empty_and_rm_missing_is_noop(xs: PyxsXenStore) -> None:
    assert xs.directory("/no/such/dir") == []
    xs.rm("/no/such/node")  # parent missing too: xenstored says ENOENT, the node is gone anyway
    xs.write("/a/b/c", "1")
    xs.rm("/a/b/missing")
    xs.rm("/a/b")
    assert xs.directory("/a") == []
    assert xs.read("/a/b/c") is None


def test_mkdir_keeps_existing_value(xs: PyxsXenStore) -> None:
    xs.write("/m/x", "keep")
    xs.mkdir("/m/x")
    xs.mkdir("/m/y/z")
    assert xs.read("/m/x") == b"keep"
    assert xs.read("/m/y/z") == b""


def test_perms_and_domain_path(sim: SimDaemon, xs: PyxsXenStore) -> None:
    sim.call(lambda: sim.server.introduce_domain(5))
    xs.write("/p", "")
    xs.set_perms("/p", ["n0", "r5"])
    assert xs.get_perms("/p") == ["n0", "r5"]
    assert xs.get_domain_path(5) == "/local/domain/5"
    with pytest.raises(api.XenError) as e:
        xs.set_perms("/p", ["x0"])
    assert e.value.errno == errno.EINVAL
    with pytest.raises(api.XenError) as e:
        xs.get_domain_path(1 << 16)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("path", ["/bad path", "/trailing/", "//double", "/a\x00b", "/ümlaut"])
def test_invalid_path_is_xenerror_einval(xs: PyxsXenStore, path: str) -> None:
    with pytest.raises(api.XenError) as e:
        xs.read(path)
    assert e.value.errno == errno.EINVAL


def test_oversized_request_refused_before_sending(xs: PyxsXenStore) -> None:
    with pytest.raises(api.XenError) as e:
        xs.write("/big", b"x" * XENSTORE_PAYLOAD_MAX)
    assert e.value.errno == errno.E2BIG
    xs.write("/still", "works")
    assert xs.read("/still") == b"works"


def test_daemon_error_keeps_its_errno(sim: SimDaemon, xs: PyxsXenStore) -> None:
    # An unprivileged domain reading dom0's private node gets the daemon's EACCES.
    sim.call(lambda: sim.server.introduce_domain(7))
    dom_sock = os.path.join(os.path.dirname(sim.path), "dom7.sock")
    sim.run(sim.server.serve_domain_socket(7, dom_sock))
    xs.write("/private", "secret")
    xs.set_perms("/private", ["n0"])
    with PyxsXenStore(unix_socket_path=dom_sock, request_timeout=5) as guest:
        with pytest.raises(api.XenError) as e:
            guest.read("/private")
        assert e.value.errno == errno.EACCES
        assert not isinstance(e.value, api.XenstoreConflict)
        # Relative paths resolve under the caller's own domain directory.
        xs.write("/local/domain/7/domid", "7")
        xs.set_perms("/local/domain/7/domid", ["n7"])
        assert guest.read("domid") == b"7"


# -- transactions --------------------------------------------------------------------------------

def test_transaction_commits_atomically(xs: PyxsXenStore) -> None:
    with xs.transaction() as t:
        t.write("/tx/a", "1")
        t.write("/tx/b", "2")
        assert t.read("/tx/a") == b"1"
        assert xs.read("/tx/a") is None  # not visible outside before commit
        assert sorted(t.directory("/tx")) == ["a", "b"]
    assert xs.read("/tx/a") == b"1" and xs.read("/tx/b") == b"2"


def test_transaction_rm_inside(xs: PyxsXenStore) -> None:
    xs.write("/txr/a", "1")
    with xs.transaction() as t:
        t.rm("/txr/a")
        t.rm("/txr/never-existed")
        assert t.read("/txr/a") is None
    assert xs.read("/txr/a") is None


def test_conflict_raises_xenstoreconflict_eagain(xs: PyxsXenStore) -> None:
    xs.write("/c", "0")
    with pytest.raises(api.XenstoreConflict) as e:
        with xs.transaction() as t:
            t.read("/c")
            xs.write("/c", "outside")
            t.write("/c", "inside")
    assert e.value.errno == errno.EAGAIN
    assert xs.read("/c") == b"outside"


def test_exception_in_body_rolls_back(xs: PyxsXenStore) -> None:
    with pytest.raises(RuntimeError):
        with xs.transaction() as t:
            t.write("/rb", "never")
            raise RuntimeError("boom")
    assert xs.read("/rb") is None
    # The daemon really ended it: a new transaction works and commits.
    with xs.transaction() as t:
        t.write("/rb", "yes")
    assert xs.read("/rb") == b"yes"


def test_run_transaction_retries_conflicts(xs: PyxsXenStore) -> None:
    xs.write("/counter", "0")
    attempts = []

    def bump(t: api.Transaction) -> int:
        attempts.append(1)
        value = int(t.read("/counter") or b"0")
        if len(attempts) < 3:
            xs.write("/counter", str(value + 100))  # someone else wins this round
        t.write("/counter", str(value + 1))
        return value + 1

    result = xs.run_transaction(bump)
    assert len(attempts) == 3
    assert result == 201
    assert xs.read("/counter") == b"201"


# -- watches -------------------------------------------------------------------------------------

def test_watch_fires_immediately_then_on_change(xs: PyxsXenStore) -> None:
    xs.write("/w/state", "1")
    assert not fd_readable(xs.watch_fileno())
    xs.watch("/w", "tok")
    assert wait_events(xs) == [("/w", "tok")]  # Xen fires every new watch once
    assert not fd_readable(xs.watch_fileno())
    xs.write("/w/state", "2")
    assert wait_events(xs) == [("/w/state", "tok")]
    xs.rm("/w")
    assert wait_events(xs) == [("/w", "tok")]


def test_unwatch_stops_events_and_drops_queued_ones(xs: PyxsXenStore) -> None:
    xs.watch("/u", "t1")
    assert wait_events(xs) == [("/u", "t1")]
    xs.write("/u/x", "1")
    time.sleep(0.2)  # the event is queued, unread
    xs.unwatch("/u", "t1")
    xs.write("/u/x", "2")
    time.sleep(0.2)
    assert xs.read_watch_events() == []


def test_same_token_on_two_paths_delivers_each_event_once(xs: PyxsXenStore) -> None:
    xs.watch("/s1", "tok")
    xs.watch("/s2", "tok")
    time.sleep(0.2)
    assert sorted(xs.read_watch_events()) == [("/s1", "tok"), ("/s2", "tok")]
    xs.write("/s1/x", "1")
    assert wait_events(xs) == [("/s1/x", "tok")]
    xs.unwatch("/s1", "tok")  # the token stays subscribed for /s2
    xs.write("/s2/y", "1")
    assert wait_events(xs) == [("/s2/y", "tok")]


def test_two_tokens_on_one_path(xs: PyxsXenStore) -> None:
    xs.watch("/tt", "a")
    xs.watch("/tt", "b")
    time.sleep(0.2)
    xs.read_watch_events()
    xs.write("/tt", "1")
    time.sleep(0.2)
    assert sorted(xs.read_watch_events()) == [("/tt", "a"), ("/tt", "b")]


def test_failed_watch_leaves_no_subscription(xs: PyxsXenStore) -> None:
    with pytest.raises(api.XenError) as e:
        xs.watch("@bogusSpecial", "t")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(api.XenError):
        xs.watch("/ok", "")
    assert xs._watches == {}


def test_special_watch_paths_accepted(sim: SimDaemon, xs: PyxsXenStore) -> None:
    xs.watch("@introduceDomain", "intro")
    assert wait_events(xs) == [("@introduceDomain", "intro")]
    sim.call(lambda: sim.server.introduce_domain(9))
    assert wait_events(xs) == [("@introduceDomain", "intro")]


def test_event_flood_is_read_in_bounded_batches(xs: PyxsXenStore) -> None:
    q = xs._monitor.events
    xs._watches[b"flood"] = {b"/f"}
    for i in range(MAX_EVENTS_PER_READ + 10):
        q.put((f"/f/{i}".encode(), b"flood"))
    first = xs.read_watch_events()
    assert len(first) == MAX_EVENTS_PER_READ
    assert fd_readable(xs.watch_fileno())  # the rest keep the fd readable
    assert len(xs.read_watch_events()) == 10


def test_event_overflow_reports_every_watch_once(xs: PyxsXenStore) -> None:
    xs.watch("/o1", "a")
    xs.watch("/o2", "b")
    time.sleep(0.2)
    xs.read_watch_events()
    q = xs._monitor.events
    q.limit = 5
    for i in range(20):
        xs.write(f"/o1/{i}", "x")
    time.sleep(0.3)
    assert q.qsize() == 5 and q.overflowed
    assert xs.read_watch_events() == [("/o1", "a"), ("/o2", "b")]
    assert q.qsize() == 0 and not q.overflowed
    xs.write("/o2/z", "1")  # normal service afterwards
    assert wait_events(xs) == [("/o2/z", "b")]


def test_signalling_queue_never_loses_a_wakeup() -> None:
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    q = _SignallingQueue(w)
    try:
        assert not fd_readable(r.fileno())
        q.put((b"/p", b"t"))
        assert fd_readable(r.fileno())
        # Reader drains the socket, then a put lands before it drains the queue: the new byte
        # keeps the fd readable even though both items are consumed now.
        r.recv(100)
        q.put((b"/p2", b"t"))
        assert [q.get_nowait(), q.get_nowait()] == [(b"/p", b"t"), (b"/p2", b"t")]
        assert fd_readable(r.fileno())
        # A full socket does not block put, nor does the item limit.
        for _ in range(200000):
            q.put((b"/x", b"t"))
        assert q.qsize() == q.limit and q.overflowed
    finally:
        r.close()
        w.close()


# -- connection life -----------------------------------------------------------------------------

def test_connect_to_missing_socket_is_unavailable(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(api.XenUnavailable) as e:
        PyxsXenStore(unix_socket_path=str(tmp_path / "nothing.sock"))
    assert e.value.errno == errno.ENOENT
    assert "nothing.sock" in str(e.value)


def test_both_paths_rejected() -> None:
    with pytest.raises(ValueError):
        PyxsXenStore(unix_socket_path="/a", xen_bus_path="/b")


def test_daemon_going_away_wakes_the_watcher_and_fails_requests(sim: SimDaemon,
                                                                xs: PyxsXenStore) -> None:
    xs.watch("/g", "t")
    wait_events(xs)
    sim.run(sim.server.close())
    deadline = time.monotonic() + 5
    while not fd_readable(xs.watch_fileno()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fd_readable(xs.watch_fileno())
    with pytest.raises(api.XenError) as e:
        xs.read_watch_events()
    assert e.value.errno == errno.ECONNRESET
    start = time.monotonic()
    with pytest.raises(api.XenError) as e:
        xs.read("/g")
    assert e.value.errno == errno.ECONNRESET
    assert time.monotonic() - start < 1


def test_closed_store_refuses_requests(sim: SimDaemon) -> None:
    store = PyxsXenStore(unix_socket_path=sim.path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(api.XenError) as e:
        store.read("/x")
    assert e.value.errno == errno.EBADF


# -- scripted peers --------------------------------------------------------------------------------

class ScriptedDaemon:
    """A unix-socket peer answering each request with ``reply(op, rq_id, tx_id, payload)``
    (return None to stay silent)."""

    def __init__(self, path: str,
                 reply: Callable[[int, int, int, bytes], bytes | None]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            buf = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= HDR.size:
                    op, rq, tx, n = HDR.unpack_from(buf)
                    if len(buf) < HDR.size + n:
                        break
                    payload, buf = buf[HDR.size:HDR.size + n], buf[HDR.size + n:]
                    out = self.reply(op, rq, tx, payload)
                    if out is not None:
                        conn.sendall(out)

    def close(self) -> None:
        self.listener.close()


def test_silent_daemon_times_out(tmp_path) -> None:  # noqa: ANN001
    path = str(tmp_path / "silent.sock")
    peer = ScriptedDaemon(path, lambda *a: None)
    store = PyxsXenStore(unix_socket_path=path, request_timeout=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(api.XenError) as e:
            store.read("/x")
        assert e.value.errno == errno.ETIMEDOUT
        assert 0.25 < time.monotonic() - start < 2
    finally:
        store.close()
        peer.close()


def test_unknown_error_name_and_mismatched_reply(tmp_path) -> None:  # noqa: ANN001
    def reply(op: int, rq: int, tx: int, payload: bytes) -> bytes:
        if payload.startswith(b"/weird"):
            body = b"EWHATEVER\0"
            return HDR.pack(Op.ERROR, rq, tx, len(body)) + body
        if payload.startswith(b"/wrongop"):
            return HDR.pack(Op.DIRECTORY, rq, tx, 0)
        body = b"ENOENT\0"
        return HDR.pack(Op.ERROR, rq, tx, len(body)) + body

    path = str(tmp_path / "scripted.sock")
    peer = ScriptedDaemon(path, reply)
    store = PyxsXenStore(unix_socket_path=path, request_timeout=2)
    try:
        with pytest.raises(api.XenError) as e:
            store.read("/weird")
        assert e.value.errno == errno.EIO
        with pytest.raises(api.XenError) as e:
            store.read("/wrongop")
        assert e.value.errno == errno.EPROTO
        assert store.read("/missing") is None
    finally:
        store.close()
        peer.close()


# -- the xenbus device connection ----------------------------------------------------------------

class FakeXenbusDevice:
    """The kernel side of ``/dev/xen/xenbus``, on a pty master, answering as
    ``xenbus_dev_frontend.c``: READs from a dict, WATCH/UNWATCH "OK" (with the request's header,
    or zeroed when ``old_kernel``), watch events as ``path\\0token\\0`` with garbage req_id."""

    def __init__(self, old_kernel: bool = False) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)  # a byte pipe: no echo, no line discipline
        self.slave_path = os.ttyname(slave)
        self._slave_keepalive = slave
        self.old_kernel = old_kernel
        self.store: dict[bytes, bytes] = {b"/local/domain/3/name": b"rm-vm"}
        self.watches: list[tuple[bytes, bytes]] = []
        self.requests: list[tuple[int, int, int, bytes]] = []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, data: bytes) -> None:
        with self.lock:
            os.write(self.master, data)

    def fire(self, path: bytes, token: bytes) -> None:
        body = path + b"\0" + token + b"\0"
        self._send(HDR.pack(Op.WATCH_EVENT, 0xDEADBEEF, 0xFFFF, len(body)) + body)

    def _serve(self) -> None:
        buf = b""
        while not self.stop:
            r, _, _ = select.select([self.master], [], [], 0.1)
            if not r:
                continue
            try:
                buf += os.read(self.master, 65536)
            except OSError:
                return
            while len(buf) >= HDR.size:
                op, rq, tx, n = HDR.unpack_from(buf)
                if len(buf) < HDR.size + n:
                    break
                payload, buf = buf[HDR.size:HDR.size + n], buf[HDR.size + n:]
                self.requests.append((op, rq, tx, payload))
                self._handle(op, rq, tx, payload)

    def _handle(self, op: int, rq: int, tx: int, payload: bytes) -> None:
        if op in (Op.WATCH, Op.UNWATCH):
            path, token = payload.split(b"\0")[:2]
            if op == Op.WATCH:
                self.watches.append((path, token))
            if self.old_kernel:
                rq = tx = 0
            self._send(HDR.pack(op, rq, tx, 3) + b"OK\0")
            if op == Op.WATCH:
                self.fire(path, token)  # xenstored fires a new watch at once
        elif op == Op.READ:
            value = self.store.get(payload.rstrip(b"\0"))
            if value is None:
                self._send(HDR.pack(Op.ERROR, rq, tx, 7) + b"ENOENT\0")
            else:
                self._send(HDR.pack(op, rq, tx, len(value)) + value)
        else:
            self._send(HDR.pack(Op.ERROR, rq, tx, 7) + b"ENOSYS\0")

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        os.close(self.master)
        os.close(self._slave_keepalive)


@pytest.fixture(params=[False, True], ids=["current-kernel", "old-kernel"])
def xenbus(request) -> Iterator[FakeXenbusDevice]:  # noqa: ANN001
    dev = FakeXenbusDevice(old_kernel=request.param)
    yield dev
    dev.close()


def test_pyxs_monitor_refuses_its_own_xenbus_connection_but_accepts_ours(
        xenbus: FakeXenbusDevice) -> None:
    theirs = Client(xen_bus_path=xenbus.slave_path)
    assert isinstance(theirs.router.connection, XenBusConnection)
    with pytest.raises(PyXSError):
        theirs.monitor()
    from pyxs.client import Router
    ours = Client(router=Router(XenBusDeviceConnection(xenbus.slave_path)))
    assert ours.monitor() is not None


def test_store_over_xenbus_device_reads_and_watches(xenbus: FakeXenbusDevice) -> None:
    with PyxsXenStore(xen_bus_path=xenbus.slave_path, request_timeout=3) as store:
        assert store.read("/local/domain/3/name") == b"rm-vm"
        assert store.read("/nothing") is None
        store.watch("/local/domain/3/device", "be")
        assert wait_events(store) == [("/local/domain/3/device", "be")]
        xenbus.fire(b"/local/domain/3/device/vkbd/0/state", b"be")
        assert wait_events(store) == [("/local/domain/3/device/vkbd/0/state", "be")]
        store.unwatch("/local/domain/3/device", "be")
        # Several watches in a row: with an old kernel every reply has req_id 0 and must still
        # be matched to the right request (replies arrive in request order).
        for i in range(5):
            store.watch(f"/w{i}", f"t{i}")
        assert len(xenbus.watches) == 6
        assert store.read("/local/domain/3/name") == b"rm-vm"
        assert list(store._router.connection._pending_watch_ids) == []


def test_xenbus_connection_writes_each_packet_in_one_write() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def send(self, data: bytes) -> None:
            self.writes.append(bytes(data))

    conn = XenBusDeviceConnection("/dev/null")
    conn.transport = Recorder()
    conn.send(Packet(Op.WRITE, b"/a\0value", 42, 7))
    conn.send(Packet(Op.WATCH, b"/a\0tok\0", 43, 0))
    assert conn.transport.writes == [HDR.pack(Op.WRITE, 42, 7, 8) + b"/a\0value",
                                     HDR.pack(Op.WATCH, 43, 0, 7) + b"/a\0tok\0"]
    assert list(conn._pending_watch_ids) == [43]


def test_xenbus_device_payload_limit_counts_the_header(xenbus: FakeXenbusDevice) -> None:
    # xenbus_dev_frontend's buffer is XENSTORE_PAYLOAD_MAX bytes including the header.
    with PyxsXenStore(xen_bus_path=xenbus.slave_path, request_timeout=3) as store:
        path = "/local/domain/3/name"
        fits = XENSTORE_PAYLOAD_MAX - 16 - len(path) - 1
        with pytest.raises(api.XenError) as e:
            store.write(path, b"v" * (fits + 1))
        assert e.value.errno == errno.E2BIG
        with pytest.raises(api.XenError) as e:  # the fake answers ENOSYS: it was sent
            store.write(path, b"v" * fits)
        assert e.value.errno == errno.ENOSYS


def test_xenbus_connection_missing_device_is_unavailable(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(api.XenUnavailable) as e:
        PyxsXenStore(xen_bus_path=str(tmp_path / "xenbus"))
    assert e.value.errno == errno.ENOENT
