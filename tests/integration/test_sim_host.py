"""Sim hosts as processes: two side by side, guests granting pages and allocating ports, a dom0
backend (``SimXen``) mapping and binding them, privilege checks, teardown, hostile clients, CLI.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dmore_nova.xen.api import XenError, XenUnavailable
from dmore_nova.xen.sim import hypercall as hc
from dmore_nova.xen.sim.client import HypercallConnection, SimToolstack
from dmore_nova.xen.sim.evtchn import EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound
from dmore_nova.xen.sim.host import hypercall_path
from dmore_nova.xen.sim.hypercall import SimOp
from dmore_nova.xen.sim.memory import PAGE_SIZE
from dmore_nova.xen.sim.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]


def _readable(fd_owner, timeout: float = 5.0) -> bool:
    r, _, _ = select.select([fd_owner], [], [], timeout)
    return bool(r)


@pytest.fixture
def sup(sim_sup):
    return sim_sup


@pytest.fixture
def host(sup):
    return sup.start_host("a")


@pytest.fixture
def guest(host):
    with host.toolstack() as ts:
        return ts.create_domain("guest", 256)


def test_two_hosts_have_separate_domid_spaces_stores_and_memory(sup):
    a, b = sup.start_host("a"), sup.start_host("b")
    assert {h.name for h in sup.list_hosts()} == {"a", "b"}
    with a.toolstack() as ta, b.toolstack() as tb:
        ga = ta.create_domain("guest-a", 64)
        gb = tb.create_domain("guest-b", 32)
        assert ga == gb == 1                           # each host starts at 1
        assert [d.name for d in ta.list_domains()] == ["Domain-0", "guest-a"]
        assert [d.name for d in tb.list_domains()] == ["Domain-0", "guest-b"]
        assert tb.domain_info(1).max_pages == 32
    xa, xb = a.xen(0), b.xen(0)
    try:
        assert xa.xenstore.read("/local/domain/1/name") == b"guest-a"
        assert xb.xenstore.read("/local/domain/1/name") == b"guest-b"
    finally:
        xa.close()
        xb.close()
    ka, kb = a.kernel(1), b.kernel(1)
    try:
        fa, fb = ka.alloc_page(), kb.alloc_page()
        ka.write(fa, 0, b"on host a")
        assert bytes(kb.page(fb)[:9]) != b"on host a"
        assert (a.shm_dir / "dom1.mem").exists() and (b.shm_dir / "dom1.mem").exists()
    finally:
        ka.close()
        kb.close()


_GUEST_SCRIPT = textwrap.dedent("""
    import json, select, sys
    from dmore_nova.xen.sim.kernel import SimKernel
    k = SimKernel(sys.argv[1], int(sys.argv[2]))
    frame = k.alloc_page()
    k.write(frame, 0, b"ring page from the guest")
    gref = k.grant_foreign_access(0, frame)
    port = k.alloc_unbound(0)
    print(json.dumps({"gref": gref, "port": port, "frame": frame}), flush=True)
    # Wait for the backend's kick, read what it wrote into our page, answer.
    while True:
        select.select([k], [], [], 10)
        if port in k.take_events():
            break
    line = bytes(k.page(frame)[100:100 + 20]).rstrip(b"\\0")
    k.write(frame, 200, b"guest saw: " + line)
    k.notify(port)
    print(json.dumps({"saw": line.decode()}), flush=True)
    sys.stdin.readline()              # until the backend is done
    print(json.dumps({"ended": k.end_foreign_access(gref)}), flush=True)
    k.close()
""")


def test_guest_process_grants_and_dom0_backend_maps_binds_and_talks_over_asyncio(host, guest):
    proc = subprocess.Popen([sys.executable, "-c", _GUEST_SCRIPT, str(host.run_dir),
                             str(guest)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    be = host.xen(0)
    try:
        hello = json.loads(proc.stdout.readline())
        page = be.map_grant(guest, hello["gref"], writable=True)
        assert bytes(page.mem[:24]) == b"ring page from the guest"
        ev = be.event_channels()
        lport = ev.bind_interdomain(guest, hello["port"])
        assert ev.status(guest, hello["port"]) == (EVTCHNSTAT_interdomain, 0, lport)

        async def backend() -> list[int]:
            loop = asyncio.get_running_loop()
            fired: asyncio.Queue[int] = asyncio.Queue()

            def on_event() -> None:
                port = ev.pending()
                if port is not None:
                    ev.unmask(port)
                    fired.put_nowait(port)

            loop.add_reader(ev.fileno(), on_event)
            try:
                # Xen raises one event on the freshly bound port (lost-notification guard).
                first = await asyncio.wait_for(fired.get(), 5)
                page.mem[100:120] = b"key event from dom0".ljust(20, b"\0")
                ev.notify(lport)
                second = await asyncio.wait_for(fired.get(), 10)
                return [first, second]
            finally:
                loop.remove_reader(ev.fileno())

        assert asyncio.run(backend()) == [lport, lport]
        assert bytes(page.mem[200:230]).rstrip(b"\0") == b"guest saw: key event from dom0"
        assert json.loads(proc.stdout.readline()) == {"saw": "key event from dom0"}
        page.unmap()
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"ended": True}
        assert proc.wait(10) == 0
        # The guest process exited: its end of the channel closed, ours is unbound again.
        time.sleep(0.1)
        assert ev.status(guest, hello["port"])[0] != EVTCHNSTAT_interdomain
        ev.notify(lport)                              # silently dropped, as on Xen
        ev.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        be.close()


def test_mask_semantics_across_processes(host, guest):
    k, be = host.kernel(guest), host.xen(0)
    try:
        port = k.alloc_unbound(0)
        ev = be.event_channels()
        lport = ev.bind_interdomain(guest, port)
        assert _readable(ev) and ev.pending() == lport   # the bind-time event
        # Still masked (not unmasked yet): guest notifies pile up as one pending bit.
        k.notify(port)
        k.notify(port)
        assert not _readable(ev, 0.2)
        ev.unmask(lport)
        assert _readable(ev) and ev.pending() == lport
        assert ev.pending() is None                        # exactly one redelivery
        ev.unmask(lport)
        assert not _readable(ev, 0.2)                      # nothing pending: just re-armed
        k.notify(port)
        assert _readable(ev) and ev.pending() == lport
        # A port this handle does not own.
        other = be.event_channels()
        with pytest.raises(XenError) as e:
            other.notify(lport)
        assert e.value.errno == errno.ENOTCONN
        other.close()
        # Guest unbinds: our notify becomes a no-op, status shows unbound naming the guest.
        k.unbind(port)
        ev.notify(lport)
        assert ev.status(0, lport) == (EVTCHNSTAT_unbound, guest, 0)
        ev.close()
    finally:
        k.close()
        be.close()


def test_bind_checks(host, guest):
    with host.toolstack() as ts:
        other = ts.create_domain("other", 16)
    k, be = host.kernel(guest), host.xen(0)
    ko = host.kernel(other)
    try:
        port = k.alloc_unbound(0)
        evo = ko.evtchn
        with pytest.raises(XenError) as e:                   # meant for dom0, not `other`
            evo.bind_interdomain(guest, port)
        assert e.value.errno == errno.EINVAL
        ev = be.event_channels()
        with pytest.raises(XenError) as e:
            ev.bind_interdomain(guest, port + 100)           # no such port
        assert e.value.errno == errno.EINVAL
        with pytest.raises(XenError) as e:
            ev.bind_interdomain(999, 1)
        assert e.value.errno == errno.ESRCH
        ev.bind_interdomain(guest, port)
        with pytest.raises(XenError) as e:                   # already bound
            ev.bind_interdomain(guest, port)
        assert e.value.errno == errno.EINVAL
        ev.close()
    finally:
        k.close()
        ko.close()
        be.close()


def test_grant_refusals(host, guest):
    k, be = host.kernel(guest), host.xen(0)
    try:
        frame = k.alloc_page()
        to_other = k.grant_foreign_access(7, frame)
        with pytest.raises(XenError) as e:
            be.map_grant(guest, to_other)
        assert e.value.errno == errno.EPERM
        with pytest.raises(XenError) as e:
            be.map_grant(guest, 1 << 20)                     # beyond the table
        assert e.value.errno == errno.EINVAL
        with pytest.raises(XenError) as e:
            be.map_grant(guest, 12345)                       # in range, never granted
        assert e.value.errno == errno.EPERM
        with pytest.raises(XenError) as e:
            be.map_grant(999, 8)
        assert e.value.errno == errno.ESRCH
        ro = k.grant_foreign_access(0, frame, readonly=True)
        with pytest.raises(XenError) as e:
            be.map_grant(guest, ro, writable=True)
        assert e.value.errno == errno.EPERM
        with be.map_grant(guest, ro, writable=False) as m:
            k.write(frame, 0, b"abc")
            assert bytes(m.mem[:3]) == b"abc"
            with pytest.raises(TypeError):
                m.mem[0] = 1
        # Revoked: mapping fails afterwards.
        assert k.end_foreign_access(ro) is True
        with pytest.raises(XenError) as e:
            be.map_grant(guest, ro, writable=False)
        assert e.value.errno == errno.EPERM
    finally:
        k.close()
        be.close()


def test_end_foreign_access_is_deferred_while_mapped(host, guest):
    k, be = host.kernel(guest), host.xen(0)
    try:
        frame = k.alloc_page()
        gref = k.grant_foreign_access(0, frame)
        m = be.map_grant(guest, gref)
        assert k.query_foreign_access(gref)
        assert k.end_foreign_access(gref) is False
        assert k.process_deferred() == 1
        m.mem[0:4] = b"late"                   # still a valid mapping: the grant stands
        assert bytes(k.page(frame)[:4]) == b"late"
        m.unmap()
        assert k.process_deferred() == 0
        with pytest.raises(XenError) as e:              # the ref went back to the free list
            k.query_foreign_access(gref)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(XenError) as e:              # and the entry is revoked
            be.map_grant(guest, gref)
        assert e.value.errno == errno.EPERM
    finally:
        k.close()
        be.close()


def test_foreign_map_needs_privilege_and_set_target_grants_it(host, guest):
    with host.toolstack() as ts:
        rm = ts.create_domain("rm-vm", 64)
        k = host.kernel(guest)
        rmx = host.xen(rm)
        be = host.xen(0)
        try:
            frames = [k.alloc_page() for _ in range(3)]
            frames = [frames[2], frames[0]]            # non-contiguous, out of order
            k.write(frames[0], 0, b"page-A")
            k.write(frames[1], 0, b"page-B")
            with pytest.raises(XenError) as e:
                rmx.map_foreign(guest, frames)
            assert e.value.errno == errno.EPERM
            with pytest.raises(XenError) as e:
                rmx.domain_info(guest)
            assert e.value.errno == errno.EPERM
            with pytest.raises(XenError) as e:
                rmx.xenstore.write(f"/local/domain/{guest}/data/probe", "x")
            assert e.value.errno == errno.EACCES
            ts.set_target(rm, guest)
            assert ts.target_of(rm) == guest
            with rmx.map_foreign(guest, frames, writable=True) as m:
                assert len(m.mem) == 2 * PAGE_SIZE
                assert bytes(m.mem[:6]) == b"page-A"
                assert bytes(m.mem[PAGE_SIZE:PAGE_SIZE + 6]) == b"page-B"
                m.mem[PAGE_SIZE + 6:PAGE_SIZE + 9] = b"!!!"
            assert bytes(k.page(frames[1])[:9]) == b"page-B!!!"
            assert rmx.domain_info(guest).name == "guest"
            with pytest.raises(XenError) as e:
                rmx.map_foreign(guest, [256])          # one past the guest's 256 pages
            assert e.value.errno == errno.EINVAL
            with pytest.raises(XenError) as e:         # target is one domain, not all
                rmx.map_foreign(0, [1])
            assert e.value.errno == errno.EPERM
            with pytest.raises(XenError) as e:
                ts.set_target(rm, 0)                   # already has a target
            assert e.value.errno == errno.EINVAL
            with be.map_foreign(guest, [frames[0]]) as m:   # dom0 always may
                assert bytes(m.mem[:6]) == b"page-A"
                with pytest.raises(TypeError):
                    m.mem[0] = 0                        # read-only by default
            # Target privilege reaches xenstore too (XS_SET_TARGET): the RM VM acts as the
            # guest on the guest's nodes.
            rmx.xenstore.write(f"/local/domain/{guest}/data/probe", "x")
            assert be.xenstore.read(f"/local/domain/{guest}/data/probe") == b"x"
        finally:
            k.close()
            rmx.close()
            be.close()


def test_unmapped_view_reads_zeros_instead_of_faulting(host, guest):
    k, be = host.kernel(guest), host.xen(0)
    try:
        frame = k.alloc_page()
        k.write(frame, 0, b"secret")
        m = be.map_foreign(guest, [frame])
        stale = m.mem[0:6]
        m.unmap()
        assert bytes(stale) == b"\0" * 6
        assert bytes(k.page(frame)[:6]) == b"secret"
        stale.release()
    finally:
        k.close()
        be.close()


def test_xenstore_skeleton_and_domain_permissions(host, guest):
    k, be = host.kernel(guest), host.xen(0)
    try:
        xs = be.xenstore
        base = f"/local/domain/{guest}"
        assert xs.read(f"{base}/name") == b"guest"
        assert xs.read(f"{base}/domid") == str(guest).encode()
        assert xs.read(f"{base}/memory/target") == b"1024"
        vm = xs.read(f"{base}/vm").decode()
        assert xs.read(f"{vm}/name") == b"guest"
        assert xs.get_perms(base) == ["n0", f"r{guest}"]
        assert xs.get_perms(f"{base}/data") == [f"n{guest}"]
        gx = k.xenstore
        assert gx.read("name") == b"guest"                  # relative to its own dir
        gx.write(f"{base}/data/hello", "world")
        assert xs.read(f"{base}/data/hello") == b"world"
        with pytest.raises(XenError) as e:
            gx.write(f"{base}/name", "renamed")
        assert e.value.errno == errno.EACCES
        with pytest.raises(XenError) as e:
            gx.read("/local/domain/0/name")
        assert e.value.errno == errno.EACCES
    finally:
        k.close()
        be.close()


def test_destroy_releases_everything_and_keeps_mapped_domain_dying(host, guest):
    k, be = host.kernel(guest), host.xen(0)
    ts = host.toolstack()
    try:
        xs = be.xenstore
        xs.watch("@releaseDomain", "rel")
        assert _readable(xs.watch_fileno())
        xs.read_watch_events()                               # the registration event
        frame = k.alloc_page()
        gref = k.grant_foreign_access(0, frame)
        port = k.alloc_unbound(0)
        m = be.map_grant(guest, gref)
        ev = be.event_channels()
        lport = ev.bind_interdomain(guest, port)
        ts.destroy_domain(guest)
        info = ts.domain_info(guest)
        assert info is not None and info.dying               # pages still mapped by dom0
        assert xs.read(f"/local/domain/{guest}/name") is None
        assert _readable(xs.watch_fileno())
        assert ("@releaseDomain", "rel") in xs.read_watch_events()
        assert ev.status(0, lport)[0] == EVTCHNSTAT_unbound
        ev.notify(lport)                                     # dropped, no error
        with pytest.raises(XenError) as e:                   # the guest's "vcpus" are gone
            k.alloc_unbound(0)
        assert e.value.errno == errno.EPIPE
        m.mem[0:2] = b"ok"                                   # mapping still valid
        m.unmap()
        assert ts.domain_info(guest) is None                 # reaped with the last pin
        assert not (host.shm_dir / f"dom{guest}.mem").exists()
        assert not hypercall_path(host.run_dir, guest).exists()
        with pytest.raises(XenError) as e:
            ts.destroy_domain(0)
        assert e.value.errno == errno.EINVAL
        ev.close()
    finally:
        ts.close()
        k.close()
        be.close()


def test_only_dom0_runs_the_toolstack(host, guest):
    conn = HypercallConnection(hypercall_path(host.run_dir, guest))
    try:
        assert conn.domid == guest
        for op, args in ((SimOp.XEN_DOMCTL_createdomain,
                          {"name": "evil", "max_pages": 1, "flags": 0}),
                         (SimOp.XEN_DOMCTL_destroydomain, {"domid": 0}),
                         (SimOp.XEN_DOMCTL_set_target, {"domid": guest, "target": 0}),
                         (SimOp.XEN_SYSCTL_getdomaininfolist, {})):
            with pytest.raises(XenError) as e:
                conn.call(op, **args)
            assert e.value.errno == errno.EPERM, op
    finally:
        conn.close()
    with host.toolstack() as ts:
        with pytest.raises(XenError) as e:
            ts.create_domain("guest", 16)                       # name taken
        assert e.value.errno == errno.EEXIST
        with pytest.raises(XenError) as e:
            ts.create_domain("huge", 1 << 30)
        assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("junk", [
    b"\xff" * 64,                                                   # unknown op
    b"\x01\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\x7f",            # 2 GiB payload
    b"\x0e\x00\x00\x00\x01\x00\x00\x00\x03\x00\x00\x00abc",         # send with 3-byte args
])
def test_malformed_hypercall_closes_only_that_connection(host, guest, junk):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(hypercall_path(host.run_dir, guest)))
    s.sendall(junk)
    assert s.recv(100) == b""                                    # closed by the host
    s.close()
    with host.toolstack() as ts:                                 # everyone else carries on
        assert ts.domain_info(guest).name == "guest"
    log = (host.run_dir / "host.log").read_text()
    assert "protocol error" in log


def test_event_fd_reports_host_death(sup):
    h = sup.start_host("c")
    be = h.xen(0)
    ev = be.event_channels()
    sup.stop_host("c")
    assert _readable(ev)
    with pytest.raises(XenError) as e:
        ev.pending()
    assert e.value.errno == errno.EPIPE
    with pytest.raises(XenError):
        be.domain_info(0)
    ev.close()
    be.close()
    with pytest.raises(XenUnavailable):
        SimToolstack(h.run_dir)


def _cli(sup: Supervisor, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmore_nova.xen.sim", "--base-dir",
                           str(sup.base_dir), "--shm-base", str(sup.shm_base), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_smoke(sup):
    r = _cli(sup, "host", "start", "cli")
    assert r.returncode == 0, r.stderr
    assert "cli" in _cli(sup, "host", "list").stdout
    r = _cli(sup, "domain", "create", "--host", "cli", "--name", "g1", "--memory", "1M")
    assert r.returncode == 0, r.stderr
    g1 = int(r.stdout)
    r = _cli(sup, "domain", "create", "--host", "cli", "--name", "rm", "--memory", "64",
             "--paused")
    rm = int(r.stdout)
    assert _cli(sup, "domain", "set-target", "--host", "cli", str(rm), str(g1)).returncode == 0
    lines = _cli(sup, "domain", "list", "--host", "cli").stdout.splitlines()
    rows = {line.split("\t")[1]: line.split("\t") for line in lines[1:]}
    assert rows["g1"][:4] == [str(g1), "g1", "256", "--"]
    assert rows["rm"] == [str(rm), "rm", "64", "-p", str(g1)]
    assert _cli(sup, "domain", "destroy", "--host", "cli", str(g1)).returncode == 0
    assert "g1" not in _cli(sup, "domain", "list", "--host", "cli").stdout
    r = _cli(sup, "domain", "destroy", "--host", "cli", "0")
    assert r.returncode == 1 and "dom0" in r.stderr
    r = _cli(sup, "domain", "list", "--host", "nosuch")
    assert r.returncode == 1 and "no sim host" in r.stderr
    assert _cli(sup, "host", "stop", "cli").returncode == 0
    assert "cli" not in _cli(sup, "host", "list").stdout


def test_client_not_reading_replies_gets_backpressure_not_lost_replies(host):
    one = hc.encode_request(SimOp.hello, 0, version=hc.SIM_PROTOCOL_VERSION)
    batch = b"".join(hc.encode_request(SimOp.hello, i, version=hc.SIM_PROTOCOL_VERSION)
                     for i in range(100))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(hypercall_path(host.run_dir, 0)))
    s.setblocking(False)
    total = 0
    while total < 64 << 20:
        try:
            n = s.send(batch)
        except BlockingIOError:
            break
        total += n
        if n < len(batch):
            break
    assert total < 64 << 20, "the host never stopped reading a client that does not read"
    with host.toolstack() as ts:                     # meanwhile everyone else is served
        assert ts.domain_info(0).name == "Domain-0"
    # Finish the request cut in half (if any) while draining: one reply per request, in order.
    off, rest = total % len(batch), (-total) % len(one)
    nreq = (total + rest) // len(one)
    s.setblocking(True)
    s.settimeout(10)
    sender = threading.Thread(target=s.sendall, args=(batch[off:off + rest],))
    sender.start()
    dec = hc.Decoder()
    got: list[int] = []
    while len(got) < nreq:
        data = s.recv(65536)
        assert data
        got += [m.req_id for m in dec.feed(data)]
    sender.join(10)
    assert got == [i % 100 for i in range(nreq)]
    s.close()


def test_readonly_mappings_get_a_readonly_fd(host, guest):
    k = host.kernel(guest)
    conn = HypercallConnection(hypercall_path(host.run_dir, 0))
    try:
        frame = k.alloc_page()
        gref = k.grant_foreign_access(0, frame, readonly=True)
        res, fds = conn.call(SimOp.GNTTABOP_map_grant_ref, dom=guest, ref=gref,
                             flags=hc.GNTMAP_host_map | hc.GNTMAP_readonly)
        assert res["frame"] == frame and len(fds) == 1
        assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        os.close(fds[0])
        conn.call(SimOp.GNTTABOP_unmap_grant_ref, handle=res["handle"])
        for writable, mode in ((0, os.O_RDONLY), (1, os.O_RDWR)):
            _, fds = conn.call(SimOp.privcmd_mmapbatch, dom=guest, writable=writable,
                               frames=[frame])
            assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == mode
            os.close(fds[0])
        with pytest.raises(XenError) as e:                  # unmapping twice
            conn.call(SimOp.GNTTABOP_unmap_grant_ref, handle=res["handle"])
        assert e.value.errno == errno.EINVAL
    finally:
        conn.close()
        k.close()


def test_notify_datagrams_on_the_evtchn_socket_are_checked_by_the_host(host, guest):
    """A notify is a datagram on the handle's own socket (no reply); the host still checks it:
    a port the handle does not own is ignored, a datagram of the wrong size closes only that
    handle, and a full socket makes notify fall back to the synchronous request."""
    k, be = host.kernel(guest), host.xen(0)
    try:
        port = k.alloc_unbound(0)
        ev = be.event_channels()
        lport = ev.bind_interdomain(guest, port)
        k.evtchn.unmask(port)  # whatever the bind raised is not what we look at below
        while k.evtchn.pending() is not None:
            pass
        kev = k.evtchn
        # Bypass the client's own ENOTCONN check, as a hostile process could.
        other = be.event_channels()
        other._sock.send(hc.encode_delivery(lport))
        ev.notify(lport)                                  # ours still works, once
        assert _readable(kev) and kev.pending() == port
        assert not _readable(kev, 0.2)
        kev.unmask(port)

        class Full:
            def __init__(self, sock):
                self.sock = sock

            def send(self, data):
                raise BlockingIOError(errno.EAGAIN, "full")

            def __getattr__(self, name):
                return getattr(self.sock, name)

        real, ev._sock = ev._sock, Full(ev._sock)
        ev.notify(lport)                                  # synchronous fallback
        ev._sock = real
        assert _readable(kev) and kev.pending() == port
        kev.unmask(port)
        other._sock.send(b"\x01\x02")                     # junk: closes `other` only
        assert _readable(other)
        with pytest.raises(XenError) as e:
            other.pending()
        assert e.value.errno == errno.EPIPE
        ev.notify(lport)
        assert _readable(kev) and kev.pending() == port
        log = (host.run_dir / "host.log").read_text()
        assert "2-byte datagram" in log
        ev.close()
    finally:
        k.close()
        be.close()
