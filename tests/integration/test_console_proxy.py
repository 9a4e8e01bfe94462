"""The console proxy end to end: websockets in, our RFB server (demo display) behind.

Browsers are played by a small RFC 6455 client written here (it must also be able to send what
no browser would: text frames, unmasked frames, absurd lengths) speaking RFB over the
websocket, and by noVNC 1.7 in headless Chromium (the real thing, through the shared harness).
Backends are :class:`DemoServerHandle` instances on their own loops; "the RM VM moved" is one
server stopped and another started on another port, with the token re-pointed.

What a test compares against is the server's own framebuffer and the input its display
received, never a hard-coded picture.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from dmore_nova.console.proxy import ConsoleProxy, ProxyOptions
from dmore_nova.console.rfb_splice import SpliceConfig
from dmore_nova.console.token_plugins import (
    ConsoleTarget,
    JSONTokenFile,
    StaticTokens,
    load_plugin,
    valid_token,
)
from dmore_nova.rm_vm.rfb import constants as C
from tests.integration.clients import (
    NOVNC_ROOT,
    assert_same_image,
    free_tcp_port,
    stop_process,
    u32_to_rgb,
    wait_for_port,
    wait_until,
)
from tests.integration.clients.fixtures import novnc_browser  # noqa: F401 (pytest fixture)
from tests.integration.clients.tls import make_test_pki
from tests.integration.rfb_harness import DemoServerHandle

RAW, DESKTOP_SIZE, EXT_DESKTOP_SIZE, LAST_RECT = (C.ENC_RAW, C.PSEUDO_DESKTOP_SIZE,
                                                  C.PSEUDO_EXTENDED_DESKTOP_SIZE,
                                                  C.PSEUDO_LAST_RECT)
#: Fast retries: tests measure behaviour, not patience.
FAST = dict(reattach_backoff_initial=0.02, reattach_backoff_max=0.1, reattach_timeout=10.0,
            connect_timeout=3.0)


# -- a websocket client that can also misbehave ------------------------------------------------

class WSRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class WSClosed(ConnectionError):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"websocket closed: {code} {reason}")
        self.code, self.reason = code, reason


class WSClient:
    """Blocking RFC 6455 client: binary messages, masking, ping answers, close frames."""

    def __init__(self, port: int, path: str, *, headers: dict[str, str] | None = None,
                 timeout: float = 5.0, tls: ssl.SSLContext | None = None,
                 rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        if rcvbuf:  # a slow reader: the proxy's writes block early
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        key = base64.b64encode(os.urandom(16)).decode()
        hdrs = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Protocol": "binary"}
        hdrs.update(headers or {})
        request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        self.sock.sendall(request.encode() + b"\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        head, _, self._buf = buf.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head else 0
        if status != 101:
            self.sock.close()
            raise WSRefused(status)
        self.data = bytearray()
        self.closed: tuple[int | None, str] | None = None

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True,
                   mask: bool = True, length: int | None = None) -> None:
        self.sock.sendall(self.frame(opcode, payload, fin=fin, mask=mask, length=length))

    @staticmethod
    def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True,
              length: int | None = None) -> bytes:
        """One frame; ``length`` may announce more than ``payload`` holds."""
        n = len(payload) if length is None else length
        first = (0x80 if fin else 0) | opcode
        mbit = 0x80 if mask else 0
        if n < 126:
            head = struct.pack(">BB", first, mbit | n)
        elif n < 65536:
            head = struct.pack(">BBH", first, mbit | 126, n)
        else:
            head = struct.pack(">BBQ", first, mbit | 127, n)
        if mask:
            m = os.urandom(4)
            arr = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(m, np.uint8),
                                                               len(payload))
            payload = m + arr.tobytes()
        return head + payload

    def send(self, data: bytes) -> None:
        self.send_frame(2, data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise WSClosed(None, "connection dropped without a close frame")
        self._buf += chunk

    def _frame(self) -> tuple[int, bytes]:
        while True:
            b = self._buf
            if len(b) >= 2:
                n, p = b[1] & 0x7F, 2
                if n == 126 and len(b) >= 4:
                    n, p = struct.unpack(">H", b[2:4])[0], 4
                elif n == 127 and len(b) >= 10:
                    n, p = struct.unpack(">Q", b[2:10])[0], 10
                if n < 126 or p > 2:
                    if len(b) >= p + n:
                        self._buf = b[p + n:]
                        return b[0] & 0x0F, b[p:p + n]
            self._fill()

    def recv_bytes(self, n: int) -> bytes:
        while len(self.data) < n:
            if self.closed:
                raise WSClosed(*self.closed)
            op, payload = self._frame()
            if op in (0, 2):
                self.data += payload
            elif op == 8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed = (code, payload[2:].decode(errors="replace"))
                raise WSClosed(*self.closed)
            elif op == 9:
                self.send_frame(10, payload)
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Read until the proxy closes; returns (code, reason)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self.recv_bytes(1 << 20)
        except WSClosed as exc:
            return exc.code, exc.reason

    def close(self) -> None:
        try:
            self.send_frame(8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


class Viewer:
    """An RFB viewer (Raw only) over :class:`WSClient`: the browser's part of the protocol."""

    def __init__(self, port: int, token: str, *, encodings=(RAW, DESKTOP_SIZE,
                                                            EXT_DESKTOP_SIZE, LAST_RECT),
                 timeout: float = 5.0, path: str | None = None, **ws_kw) -> None:
        path = f"/websockify?token={token}" if path is None else path
        self.ws = WSClient(port, path, timeout=timeout, **ws_kw)
        ws = self.ws
        assert ws.recv_bytes(12) == b"RFB 003.008\n"
        ws.send(b"RFB 003.008\n")
        n = ws.recv_bytes(1)[0]
        if n == 0:
            reason = ws.recv_bytes(struct.unpack(">I", ws.recv_bytes(4))[0]).decode()
            raise ConnectionRefusedError(reason)
        assert ws.recv_bytes(n) == b"\x01"
        ws.send(b"\x01")
        assert ws.recv_bytes(4) == b"\0\0\0\0"
        ws.send(b"\x01")
        self.width, self.height = struct.unpack(">HH", ws.recv_bytes(4))
        ws.recv_bytes(16)
        self.name = ws.recv_bytes(struct.unpack(">I", ws.recv_bytes(4))[0])
        self.fb = np.zeros((self.height, self.width), np.uint32)
        ws.send(struct.pack(">BxH", 2, len(encodings))
                + b"".join(struct.pack(">i", e) for e in encodings))
        self.resizes: list[tuple[int, int, int]] = []

    def request(self, incremental: bool = False) -> None:
        self.ws.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    def type(self, text: str) -> None:
        self.ws.send(b"".join(struct.pack(">BBxxI", 4, down, ord(ch))
                              for ch in text for down in (1, 0)))

    def read_update(self) -> list[tuple[int, int, int, int, int]]:
        ws = self.ws
        while True:
            mtype = ws.recv_bytes(1)[0]
            if mtype == 0:
                break
            if mtype in (2, 150):
                continue
            if mtype == 3:
                ws.recv_bytes(3)
                ws.recv_bytes(abs(struct.unpack(">i", ws.recv_bytes(4))[0]))
                continue
            if mtype == 248:
                ws.recv_bytes(7)
                ws.recv_bytes(ws.recv_bytes(1)[0])
                continue
            raise AssertionError(f"unexpected server message {mtype}")
        ws.recv_bytes(1)
        (count,) = struct.unpack(">H", ws.recv_bytes(2))
        rects = []
        for _ in range(count):
            x, y, w, h, enc = struct.unpack(">HHHHi", ws.recv_bytes(12))
            rects.append((x, y, w, h, enc))
            if enc == RAW:
                data = ws.recv_bytes(w * h * 4)
                if w and h:
                    self.fb[y:y + h, x:x + w] = np.frombuffer(data, "<u4").reshape(h, w)
            elif enc == DESKTOP_SIZE:
                self._resize(w, h, enc)
            elif enc == EXT_DESKTOP_SIZE:
                nscreens = ws.recv_bytes(4)[0]
                ws.recv_bytes(16 * nscreens)
                if not (x == 1 and y != 0):
                    self._resize(w, h, enc)
            elif enc == LAST_RECT:
                break
            else:
                raise AssertionError(f"unexpected encoding {enc}")
        return rects

    def _resize(self, w: int, h: int, enc: int) -> None:
        self.width, self.height = w, h
        self.fb = np.zeros((h, w), np.uint32)
        self.resizes.append((w, h, enc))

    def read_full_update(self, timeout: float = 10.0) -> list[tuple[int, int, int, int, int]]:
        """Read updates until one Raw rectangle covered the whole framebuffer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rects = self.read_update()
            if any(r[:4] == (0, 0, self.width, self.height) and r[4] == RAW for r in rects):
                return rects
        raise AssertionError("no full update")

    def screen(self) -> np.ndarray:
        return u32_to_rgb(self.fb)

    def close(self) -> None:
        self.ws.close()


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def proxy_factory():
    proxies: list[ConsoleProxy] = []

    def make(plugin=None, **options) -> ConsoleProxy:
        splice = options.pop("splice", None)
        opts = ProxyOptions(**{**FAST, **options})
        if splice is not None:
            opts.splice = splice
        p = ConsoleProxy(plugin if plugin is not None else StaticTokens(), opts)
        p.start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()


class _Servers:
    """Demo RFB servers ("RM VMs") that a test may kill; the rest are stopped at the end."""

    def __init__(self) -> None:
        self.live: list[DemoServerHandle] = []

    def __call__(self, **kw) -> DemoServerHandle:
        h = DemoServerHandle(**kw)
        self.live.append(h)
        return h

    def kill(self, h: DemoServerHandle) -> None:
        self.live.remove(h)
        h.stop()


@pytest.fixture
def rm_servers():
    servers = _Servers()
    yield servers
    for h in servers.live:
        h.stop()


def target(server, **kw) -> ConsoleTarget:
    return ConsoleTarget(server.host, server.port, **kw)


def session_of(proxy: ConsoleProxy, token: str):
    found = [s for s in proxy.sessions() if s.token == token]
    assert len(found) == 1, proxy.sessions()
    return found[0]


def wait_attached(proxy: ConsoleProxy, token: str, port: int, timeout: float = 10.0):
    return wait_until(lambda: next((s for s in proxy.sessions() if s.token == token
                                    and s.attached and s.endpoint[1] == port), None),
                      timeout, what=f"session {token} attached to port {port}")


# -- the ordinary path ---------------------------------------------------------------------------

def test_typing_and_full_update_through_the_proxy(demo_server, proxy_factory):
    proxy = proxy_factory(StaticTokens({"t1": target(demo_server)}))
    v = Viewer(proxy.port, "t1")
    assert (v.width, v.height, v.name) == (800, 600, b"dmore-nova demo")
    v.type("hello")
    demo_server.wait_for(lambda: demo_server.text() == "hello", what="typed text")
    v.request(incremental=False)
    v.read_full_update()
    assert_same_image(v.screen(), demo_server.framebuffer_rgb())
    assert demo_server.viewer_count() == 1
    v.close()
    demo_server.wait_for(lambda: demo_server.viewer_count() == 0, what="backend closed")


def test_wss_with_a_certificate(demo_server, proxy_factory, tmp_path):
    pki = make_test_pki(tmp_path)
    proxy = proxy_factory(StaticTokens({"t": target(demo_server)}),
                          cert_file=str(pki.server_cert), key_file=str(pki.server_key))
    assert proxy.ws_url("t").startswith("wss://")
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    v = Viewer(proxy.port, "t", tls=client_ctx)
    v.type("tls")
    demo_server.wait_for(lambda: demo_server.text() == "tls", what="keys over wss")
    for _ in range(3):  # 1.9 MB updates: TLS writes that would block, several times
        v.request(incremental=False)
        v.read_full_update()
    assert_same_image(v.screen(), demo_server.framebuffer_rgb())
    with pytest.raises((WSRefused, OSError)):  # plain ws to a wss proxy gets nowhere
        WSClient(proxy.port, "/websockify?token=t", timeout=2)


def test_pings_and_keys_are_handled_while_an_update_is_stuck(demo_server_factory, proxy_factory):
    demo_server = demo_server_factory(width=2048, height=1536)
    proxy = proxy_factory(StaticTokens({"t": target(demo_server)}))
    v = Viewer(proxy.port, "t", rcvbuf=4096)
    ws = v.ws
    v.request(incremental=False)       # a 12 MB update the proxy cannot write at once...
    time.sleep(0.3)
    ws.send_frame(9, b"ping-1")         # ...and pings while it is stuck
    ws.send_frame(9, b"ping-2")
    v.type("k")                         # keys do not wait behind the update either
    demo_server.wait_for(lambda: demo_server.text() == "k", what="key during a stuck update")
    pongs, data = [], bytearray()
    while len(pongs) < 2 or len(data) < 4 + 12 + 2048 * 1536 * 4:
        op, payload = ws._frame()
        if op == 10:
            pongs.append(payload)
        elif op == 2:
            data += payload
        else:
            raise AssertionError(f"unexpected opcode {op}")
    assert pongs == [b"ping-1", b"ping-2"]
    assert data[:4] == struct.pack(">BxH", 0, 1) and len(data) == 4 + 12 + 2048 * 1536 * 4
    v.type("p")
    demo_server.wait_for(lambda: demo_server.text() == "kp", what="session still healthy")


def test_vnc_authentication_towards_the_backend(demo_server_factory, proxy_factory):
    server = demo_server_factory(password="pa55word")
    tokens = StaticTokens({"good": target(server, password="pa55word"),
                           "bad": target(server, password="nope"),
                           "none": target(server)})
    proxy = proxy_factory(tokens)
    v = Viewer(proxy.port, "good")
    v.type("x")
    server.wait_for(lambda: server.text() == "x", what="key through an authenticated backend")
    with pytest.raises(ConnectionRefusedError, match="VNC authentication failed"):
        Viewer(proxy.port, "bad")
    with pytest.raises(ConnectionRefusedError, match="no password is configured"):
        Viewer(proxy.port, "none")


def test_unreachable_backend_is_reported_in_the_rfb_handshake(proxy_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound, not listening: connections are refused
        proxy = proxy_factory(StaticTokens({"t": ConsoleTarget("127.0.0.1", dead_port)}))
        with pytest.raises(ConnectionRefusedError, match="cannot reach the console.*refused"):
            Viewer(proxy.port, "t")


# -- re-attach -----------------------------------------------------------------------------------

def test_backend_dies_new_one_elsewhere_websocket_stays_and_keys_arrive(rm_servers,
                                                                        proxy_factory):
    h1 = rm_servers()
    tokens = StaticTokens({"vm": target(h1)})
    proxy = proxy_factory(tokens)
    v = Viewer(proxy.port, "vm")
    v.request()
    v.read_full_update()
    v.type("ab")
    h1.wait_for(lambda: h1.text() == "ab", what="keys before the move")
    rm_servers.kill(h1)  # the RM VM's endpoint goes away...
    wait_until(lambda: not session_of(proxy, "vm").attached, 5, what="detach")
    v.type("cd")  # ...while the user keeps typing
    wait_until(lambda: session_of(proxy, "vm").pending_input == 4 * 8, 5, what="queued keys")
    time.sleep(0.3)  # a few failed attempts against the old endpoint
    h2 = rm_servers(width=640, height=480)
    tokens.set("vm", target(h2))  # ...and comes back somewhere else
    info = wait_attached(proxy, "vm", h2.port)
    assert info.reattaches == 1 and info.last_pause >= 0.3
    h2.wait_for(lambda: h2.text() == "cd", what="keys typed during the gap")
    # The browser was told the new size and got a full update without asking.
    v.read_full_update()
    assert v.resizes == [(640, 480, EXT_DESKTOP_SIZE)]
    assert_same_image(v.screen(), h2.framebuffer_rgb())
    v.type("e")
    h2.wait_for(lambda: h2.text() == "cde", what="keys after the move")
    assert v.ws.closed is None


def test_cut_in_the_middle_of_an_update_is_padded(demo_server_factory, proxy_factory):
    """A backend that dies halfway through a FramebufferUpdate: the browser gets the whole
    rectangles it already had, empty ones for the rest, then a full update from the next."""
    ready = threading.Event()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def half_update_server() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(b"RFB 003.008\n")
            conn.recv(12)
            conn.sendall(b"\x01\x01")
            conn.recv(1)
            conn.sendall(b"\0\0\0\0")
            conn.recv(1)
            conn.sendall(struct.pack(">HH", 800, 600) + bytes.fromhex(
                "2018000100ff00ff00ff100800000000") + struct.pack(">I", 4) + b"fake")
            ready.wait(5)
            rect = struct.pack(">HHHHi", 0, 0, 4, 4, RAW) + b"\x7f" * 64
            conn.sendall(struct.pack(">BxH", 0, 3) + rect + rect[:40])
            time.sleep(0.2)

    t = threading.Thread(target=half_update_server, daemon=True)
    t.start()
    tokens = StaticTokens({"vm": ConsoleTarget("127.0.0.1", lsock.getsockname()[1])})
    proxy = proxy_factory(tokens)
    v = Viewer(proxy.port, "vm")
    h2 = demo_server_factory()
    tokens.set("vm", target(h2))
    ready.set()
    rects = v.read_update()
    assert rects == [(0, 0, 4, 4, RAW), (0, 0, 0, 0, RAW), (0, 0, 0, 0, RAW)]
    assert (v.fb[:4, :4] == 0x7F7F7F7F).all()
    wait_attached(proxy, "vm", h2.port)
    v.read_full_update()
    assert_same_image(v.screen(), h2.framebuffer_rgb())
    t.join(5)
    lsock.close()


def test_explicit_reattach_switches_before_breaking(demo_server_factory, proxy_factory):
    h1, h2 = demo_server_factory(), demo_server_factory()
    tokens = StaticTokens({"vm": target(h1, key="inst-1")})
    proxy = proxy_factory(tokens)
    v = Viewer(proxy.port, "vm")
    v.type("1")
    h1.wait_for(lambda: h1.text() == "1", what="first key")
    tokens.set("vm", target(h2, key="inst-1"))
    # The orchestrator's signal, over HTTP from a control host.
    req = urllib.request.Request(f"{proxy.url}reattach?token=vm", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read()) == {"sessions": 1}
    wait_attached(proxy, "vm", h2.port)
    h1.wait_for(lambda: h1.viewer_count() == 0, what="old backend released")
    v.type("2")
    h2.wait_for(lambda: h2.text() == "2", what="key to the new backend")
    assert h1.text() == "1"
    # In-process, by the key that survives moves (Nova: the instance UUID).
    tokens.set("vm", target(h1, key="inst-1"))
    assert proxy.reattach(key="inst-1") == 1
    assert proxy.reattach(key="other") == 0
    wait_attached(proxy, "vm", h1.port)
    v.type("3")
    h1.wait_for(lambda: h1.text() == "13", what="key after switching back")
    assert session_of(proxy, "vm").reattaches == 2 and v.ws.closed is None


def test_reattach_endpoint_control(demo_server, proxy_factory):
    proxy = proxy_factory(StaticTokens({"vm": target(demo_server)}), control_hosts=())
    req = urllib.request.Request(f"{proxy.url}reattach?token=vm", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403
    proxy2 = proxy_factory(StaticTokens({"vm": target(demo_server)}))
    for query, code in (("token=nobody", 404), ("", 400)):
        req = urllib.request.Request(f"{proxy2.url}reattach?{query}", method="POST", data=b"")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == code


def test_reattach_gives_up_after_the_timeout(rm_servers, proxy_factory):
    h1 = rm_servers()
    proxy = proxy_factory(StaticTokens({"vm": target(h1)}), reattach_timeout=0.5)
    v = Viewer(proxy.port, "vm")
    t0 = time.monotonic()
    rm_servers.kill(h1)
    code, reason = v.ws.wait_closed(timeout=5)
    assert 0.4 < time.monotonic() - t0 < 3
    assert code == 1011 and "could not be re-attached within 0.5 s" in reason
    wait_until(lambda: not proxy.sessions(), 5, what="session gone")


def test_token_file_plugin_drives_reattach(rm_servers, proxy_factory, tmp_path):
    path = tmp_path / "tokens.json"

    def write(doc) -> None:
        tmp = tmp_path / "tokens.json.new"
        tmp.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        os.replace(tmp, path)

    h1 = rm_servers()
    write({"vm": {"host": h1.host, "port": h1.port}})
    plugin = load_plugin("dmore_nova.console.token_plugins.JSONTokenFile", str(path))
    proxy = proxy_factory(plugin)
    v = Viewer(proxy.port, "vm")
    rm_servers.kill(h1)
    write("{ half written")  # refused as a whole: the old mapping stays
    time.sleep(0.2)
    assert plugin.last_error and "cannot read" in plugin.last_error
    h2 = rm_servers()
    write({"vm": {"host": h2.host, "port": h2.port}})
    wait_attached(proxy, "vm", h2.port)
    v.type("z")
    h2.wait_for(lambda: h2.text() == "z", what="key after the token file changed")


# -- refusals and hostile input ------------------------------------------------------------------

def test_wrong_missing_or_malformed_token_is_refused(demo_server, proxy_factory):
    proxy = proxy_factory(StaticTokens({"good": target(demo_server)}))
    for path in ("/websockify?token=bad", "/websockify", "/websockify?token=" + "a" * 300,
                 "/websockify?token=%00x"):
        with pytest.raises(WSRefused) as e:
            WSClient(proxy.port, path)
        assert e.value.status == 403, path
    assert demo_server.viewer_count() == 0
    # The token may also come as a cookie (as Nova's proxy accepts it).
    v = Viewer(proxy.port, "", path="/websockify", headers={"Cookie": "token=good"})
    assert v.width == 800


def test_tokens_and_passwords_stay_out_of_the_logs(demo_server_factory, proxy_factory,
                                                   caplog):
    server = demo_server_factory(password="hunter22")
    token = "0f4d6a8e-2b8c-4a57-9f6e-5e6d1c2b3a4f"
    proxy = proxy_factory(StaticTokens({token: target(server, password="hunter22")}))
    with caplog.at_level(logging.DEBUG):
        v = Viewer(proxy.port, token)
        v.close()
        with pytest.raises(WSRefused):
            WSClient(proxy.port, "/websockify?token=wrong-but-secret-0123456789")
        wait_until(lambda: not proxy.sessions(), 5, what="session end")
    assert "websockify?token=***" in caplog.text
    for secret in (token, "hunter22", "wrong-but-secret-0123456789"):
        assert secret not in caplog.text


def test_foreign_origin_is_refused(demo_server, proxy_factory):
    proxy = proxy_factory(StaticTokens({"t": target(demo_server)}),
                          allowed_origins=("console.example",))
    with pytest.raises(WSRefused) as e:
        WSClient(proxy.port, "/websockify?token=t", headers={"Origin": "http://evil.example"})
    assert e.value.status == 403
    for origin in (f"http://127.0.0.1:{proxy.port}", "https://console.example"):
        Viewer(proxy.port, "t", headers={"Origin": origin}).close()


def _rfb_ready(port: int, token: str) -> WSClient:
    """A websocket that finished the RFB handshake (ServerInit read)."""
    v = Viewer(port, token)
    return v.ws


@pytest.mark.parametrize("attack, expect_code", [
    ("text_frame", 1003),
    ("unmasked_frame", 1002),
    ("huge_frame", 1009),
    ("huge_frame_behind_another", 1009),
    ("fragment_flood", 1009),
    ("unknown_rfb_message", 1008),
    ("cut_text_too_long", 1008),
    ("garbage_instead_of_rfb", 1008),
])
def test_hostile_websocket_input_closes_only_that_connection(demo_server, proxy_factory,
                                                             attack, expect_code):
    proxy = proxy_factory(StaticTokens({"t": target(demo_server)}),
                          splice=SpliceConfig(max_cut_text=4096))
    good = Viewer(proxy.port, "t")
    if attack == "garbage_instead_of_rfb":
        bad = WSClient(proxy.port, "/websockify?token=t")
        bad.recv_bytes(12)
        bad.send(b"GET / HTTP/1.0\r\n\r\n")
    else:
        bad = _rfb_ready(proxy.port, "t")
        if attack == "text_frame":
            bad.send_frame(1, b"hello")
        elif attack == "unmasked_frame":
            bad.send_frame(2, b"\x04\x01\0\0\0\0\0\x61", mask=False)
        elif attack == "huge_frame":
            bad.send_frame(2, b"\0" * 16, length=1 << 40)  # announces 1 TiB, sends a little
            try:
                bad.sock.sendall(b"\0" * 100_000)
            except OSError:
                pass
        elif attack == "huge_frame_behind_another":
            # In one write: an ordinary key event, then a header announcing 1 TiB, then silence.
            bad.sock.sendall(WSClient.frame(2, b"\x04\x01\0\0\0\0\0\x61")
                             + WSClient.frame(2, b"", length=1 << 40))
        elif attack == "fragment_flood":
            bad.send_frame(2, b"\x06", fin=False)
            try:
                for _ in range(40):
                    bad.send_frame(0, b"\0" * 4096, fin=False)
            except OSError:
                pass  # closed by the proxy mid-flood, as it should be
        elif attack == "unknown_rfb_message":
            bad.send(b"\x42" + b"\0" * 20)
        elif attack == "cut_text_too_long":
            bad.send(b"\x06\0\0\0" + struct.pack(">I", 5000) + b"x" * 5000)
    code, _ = bad.wait_closed(timeout=10)
    assert code == expect_code
    wait_until(lambda: demo_server.viewer_count() == 1, 5, what="hostile backend closed")
    good.type("ok")
    demo_server.wait_for(lambda: demo_server.text() == "ok", what="the other session's keys")
    good.request()
    good.read_full_update()
    assert_same_image(good.screen(), demo_server.framebuffer_rgb())


def test_browser_that_never_finishes_the_handshake_is_closed(demo_server, proxy_factory):
    proxy = proxy_factory(StaticTokens({"t": target(demo_server)}), handshake_timeout=0.5)
    slow = WSClient(proxy.port, "/websockify?token=t")
    assert slow.recv_bytes(12) == b"RFB 003.008\n"
    t0 = time.monotonic()
    code, reason = slow.wait_closed()
    assert 0.3 < time.monotonic() - t0 < 3
    assert code == 1008 and "did not finish the RFB handshake in 0.5 s" in reason
    wait_until(lambda: demo_server.viewer_count() == 0, 5, what="its backend released")


def test_connection_limit(demo_server, proxy_factory):
    proxy = proxy_factory(StaticTokens({"t": target(demo_server)}), max_connections=1)
    v = Viewer(proxy.port, "t")
    with pytest.raises(WSRefused) as e:
        WSClient(proxy.port, "/websockify?token=t")
    assert e.value.status == 503
    v.close()
    wait_until(lambda: not proxy.sessions(), 5, what="first session gone")
    wait_until(lambda: _can_connect(proxy.port), 5, what="a slot again")


def _can_connect(port: int) -> bool:
    try:
        Viewer(port, "t").close()
        return True
    except WSRefused:
        return False


def test_stop_closes_sessions_with_a_reason(demo_server, proxy_factory):
    proxy = proxy_factory(StaticTokens({"t": target(demo_server)}))
    v = Viewer(proxy.port, "t")
    proxy.stop()
    code, reason = v.ws.wait_closed()
    assert code == 1011 and "shutting down" in reason


def test_console_page_and_novnc_are_served(proxy_factory):
    proxy = proxy_factory(novnc_root=str(NOVNC_ROOT))

    def get(path: str):
        return urllib.request.urlopen(proxy.url.rstrip("/") + path, timeout=5)

    with get("/console.html?token=abc") as r:
        assert r.headers["Content-Type"].startswith("text/html")
        assert b"import RFB from './novnc/core/rfb.js'" in r.read()
    with get("/novnc/core/rfb.js") as r:
        assert r.headers["Content-Type"] == "text/javascript"
        assert (NOVNC_ROOT / "core" / "rfb.js").read_bytes() == r.read()
    with get("/?path=%3Ftoken%3Dabc") as r:  # a Nova-style URL lands on the page, query kept
        assert r.url.endswith("/console.html?path=%3Ftoken%3Dabc")
    for path in ("/novnc/../../../../etc/passwd", "/novnc/core/", "/nothing.html",
                 "/%2e%2e/%2e%2e/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(path)
        assert e.value.code == 404, path


# -- token plugins -------------------------------------------------------------------------------

def test_json_token_file_rereads_validates_and_keeps_the_last_good(tmp_path, caplog):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"a": {"host": "10.0.0.1", "port": 5901, "password": "pw",
                                      "key": "uuid-1"}}))
    plugin = JSONTokenFile(str(path))
    assert plugin.resolve("a") == ConsoleTarget("10.0.0.1", 5901, "pw", "uuid-1")
    assert plugin.lookup("a") == ["10.0.0.1", 5901]  # websockify's API
    assert "pw" not in repr(plugin.resolve("a"))
    path.write_text(json.dumps({
        "a": {"host": "10.0.0.2", "port": 5902},
        "b": {"host": "x", "port": 70000},        # skipped: bad port
        "c": {"host": "x", "port": 1, "evil": 1},  # skipped: unknown field
        "bad token!": {"host": "x", "port": 1},    # skipped: invalid token
        "d": "not an object",
    }))
    assert plugin.resolve("a") == ConsoleTarget("10.0.0.2", 5902)
    assert [plugin.resolve(t) for t in ("b", "c", "d")] == [None, None, None]
    path.write_text("[1, 2")
    assert plugin.resolve("a") == ConsoleTarget("10.0.0.2", 5902) and plugin.last_error
    path.unlink()
    assert plugin.resolve("a") == ConsoleTarget("10.0.0.2", 5902)
    assert "cannot stat" in plugin.last_error


def test_plugin_loading_and_token_validation():
    assert isinstance(load_plugin("dmore_nova.console.token_plugins.StaticTokens", None),
                      StaticTokens)
    for bad in ("websockify.token_plugins.TokenFile", "nope.Nope", "Nope"):
        with pytest.raises(ValueError):
            load_plugin(bad, "x")
    assert valid_token("0f4d6a8e-2b8c-4a57-9f6e-5e6d1c2b3a4f")
    assert not any(valid_token(t) for t in ("", "a" * 257, "a b", "a\nb", None, 5))


# -- noVNC in Chromium -----------------------------------------------------------------------------

@pytest.mark.browser
def test_novnc_rides_through_a_move(rm_servers, proxy_factory, novnc_browser):  # noqa: F811
    h1 = rm_servers()
    tokens = StaticTokens({"vm": target(h1)})
    proxy = proxy_factory(tokens)
    viewer = novnc_browser.open(proxy.ws_url("vm"))
    try:
        assert viewer.connected, viewer.state()
        viewer.type("before ")
        h1.wait_for(lambda: h1.text() == "before ", what="keys before the move")
        viewer.wait_for_screen(h1.framebuffer_rgb())
        rm_servers.kill(h1)
        wait_until(lambda: not session_of(proxy, "vm").attached, 5, what="detach")
        viewer.type("gap ")
        wait_until(lambda: session_of(proxy, "vm").pending_input >= 8 * 8, 5,
                   what="keys queued in the proxy")
        h2 = rm_servers(width=720, height=540)
        tokens.set("vm", target(h2))
        wait_attached(proxy, "vm", h2.port)
        h2.wait_for(lambda: h2.text() == "gap ", what="keys typed during the gap")
        viewer.type("after")
        h2.wait_for(lambda: h2.text() == "gap after", what="keys after the move")
        viewer.wait_for_screen(h2.framebuffer_rgb())
        st = viewer.state()
        assert st["state"] == "connected" and (st["width"], st["height"]) == (720, 540)
        assert "disconnect" not in " ".join(st.get("log", [])), st
    finally:
        viewer.close()


# -- the daemon ----------------------------------------------------------------------------------

def test_daemon_from_a_config_file(demo_server, tmp_path):
    """``python -m dmore_nova.console`` with [console] options: serves a token from its token
    file, and SIGTERM closes the session and exits 0."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"vm": {"host": demo_server.host, "port": demo_server.port}}))
    port = free_tcp_port()
    conf = tmp_path / "dmore.conf"
    conf.write_text(f"[console]\nlisten = 127.0.0.1\nport = {port}\ntoken_source = {tokens}\n"
                    f"novnc_root = {NOVNC_ROOT}\nreattach_timeout = 5\nmax_connections = 8\n")
    proc = subprocess.Popen([sys.executable, "-m", "dmore_nova.console", "--config-file",
                             str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 20, alive=lambda: proc.poll() is None)
        v = Viewer(port, "vm")
        v.type("d")
        demo_server.wait_for(lambda: demo_server.text() == "d", what="key through the daemon")
        proc.send_signal(signal.SIGTERM)
        code, reason = v.ws.wait_closed(timeout=10)
        assert code == 1011 and "shutting down" in reason
        assert proc.wait(timeout=10) == 0
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


def test_bad_daemon_config_fails_clearly(tmp_path):
    conf = tmp_path / "dmore.conf"
    conf.write_text("[console]\ntoken_plugin = no.such.Plugin\n")
    r = subprocess.run([sys.executable, "-m", "dmore_nova.console", "--config-file", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot load token plugin 'no.such.Plugin'" in r.stderr
    conf.write_text("[console]\n")  # JSONTokenFile without a source
    r = subprocess.run([sys.executable, "-m", "dmore_nova.console", "--config-file", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs the path of the token file" in r.stderr


# -- the console page in Chromium ----------------------------------------------------------------

#: A minimal playwright-core driver for *our* page (the shared harness drives its own page):
#: load the URL, then answer stdin lines "status", "type <text>", "quit" with JSON lines.
CONSOLE_PAGE_DRIVER = r"""
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';
const [jsRoot, url] = process.argv.slice(2);
const require = createRequire(path.join(jsRoot, 'package.json'));
const { chromium } = require('playwright-core');
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run',
         '--disable-background-networking'],
});
const page = await browser.newPage();
const log = [];
page.on('console', (m) => log.push(m.type() + ': ' + m.text()));
page.on('pageerror', (e) => log.push('pageerror: ' + e.message));
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const status = async () => ({
  status: await page.$eval('#status', (e) => e.textContent),
  name: await page.$eval('#name', (e) => e.textContent), log: log.slice(-20) });
await page.goto(url);
await page.waitForFunction(() => {
  const t = document.getElementById('status').textContent;
  return t !== 'Loading...' && t !== 'Connecting...';
}, null, { timeout: 20000 });
out(await status());
for await (const line of readline.createInterface({ input: process.stdin })) {
  if (line === 'quit') break;
  if (line.startsWith('type ')) await page.keyboard.type(line.slice(5));
  out(await status());
}
await browser.close();
process.exit(0);
"""


class ConsolePage:
    """Our console.html in headless Chromium, loaded from the proxy itself."""

    def __init__(self, url: str, tmp_path) -> None:
        from tests.integration.clients import JS_ROOT

        script = tmp_path / "console_page.mjs"
        script.write_text(CONSOLE_PAGE_DRIVER)
        self.proc = subprocess.Popen(["node", str(script), str(JS_ROOT), url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.first = self._line()

    def _line(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"console page driver ended: {err[-2000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_process(self.proc)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.mark.browser
def test_console_page_connects_and_survives_a_move(rm_servers, proxy_factory, tmp_path):
    h1 = rm_servers()
    tokens = StaticTokens({"vm": target(h1)})
    proxy = proxy_factory(tokens, novnc_root=str(NOVNC_ROOT))
    page = ConsolePage(f"{proxy.url}console.html?token=vm", tmp_path)
    try:
        assert page.first["status"] == "Connected", page.first
        assert page.first["name"] == "dmore-nova demo"
        page.ask("type ab")
        h1.wait_for(lambda: h1.text() == "ab", what="keys from the console page")
        rm_servers.kill(h1)
        wait_until(lambda: not session_of(proxy, "vm").attached, 5, what="detach")
        page.ask("type cd")
        h2 = rm_servers()
        tokens.set("vm", target(h2))
        h2.wait_for(lambda: h2.text() == "cd", what="keys typed on the page during the move")
        assert page.ask("status")["status"] == "Connected"
    finally:
        page.close()
    # A bad token: the page says it could not connect instead of hanging.
    bad = ConsolePage(f"{proxy.url}console.html?token=nope", tmp_path)
    try:
        assert bad.first["status"] in ("Connection lost", "Disconnected"), bad.first
    finally:
        bad.close()
    missing = ConsolePage(f"{proxy.url}console.html", tmp_path)
    try:
        assert missing.first["status"].startswith("No console token"), missing.first
    finally:
        missing.close()
