"""The sans-IO RFB server core, driven byte by byte as real clients would (no sockets)."""

from __future__ import annotations

import datetime
import ssl
import struct
from collections.abc import Callable, Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dmore_nova.rm_vm.rfb import constants as C
from dmore_nova.rm_vm.rfb import events as ev
from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput, Rect
from dmore_nova.rm_vm.rfb.pixelformat import NATIVE, PixelFormat
from dmore_nova.rm_vm.rfb.protocol import (
    PLAIN_MAX_FIELD,
    ConnState,
    LocalProtocolError,
    ServerConfig,
    ServerConnection,
    cursor_rect,
    desktop_size_rect,
    ext_key_event_ack_rect,
    extended_desktop_size_rect,
    last_rect_rect,
    led_state_rect,
    rect_header,
)
from dmore_nova.rm_vm.rfb.security import make_anon_tls_context, vnc_auth_response

CHALLENGE = bytes(range(100, 116))
PASSWORD = b"s3cret!!"


# -- client-side helpers ------------------------------------------------------------------------

def config(**kw: object) -> ServerConfig:
    kw.setdefault("security_types", [C.SEC_NONE])
    kw.setdefault("randbytes", lambda n: CHALLENGE[:n])
    return ServerConfig(**kw)  # type: ignore[arg-type]


def connect(cfg: ServerConfig | None = None, width: int = 640, height: int = 480,
            name: str = "dom7") -> ServerConnection:
    return ServerConnection(cfg or config(), width=width, height=height, name=name)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def server_init(width: int = 640, height: int = 480, name: str = "dom7") -> bytes:
    n = name.encode()
    return struct.pack(">HH", width, height) + NATIVE.pack() + u32(len(n)) + n


def normal(cfg: ServerConfig | None = None, **kw: object) -> ServerConnection:
    """A connection through a 3.8 None handshake, output drained."""
    conn = connect(cfg, **kw)  # type: ignore[arg-type]
    conn.data_to_send()
    events = conn.receive_data(b"RFB 003.008\n\x01\x01")
    assert events == [ev.ClientInit(True)]
    assert conn.state is ConnState.NORMAL
    conn.data_to_send()
    return conn


def closed_with(events: Sequence[object], conn: ServerConnection, error: bool = True) -> str:
    """Assert the last event closes the connection; return its reason."""
    assert events, "expected a ConnectionClosed event"
    last = events[-1]
    assert isinstance(last, ev.ConnectionClosed), events
    assert last.error is error
    assert conn.state is ConnState.CLOSED
    return last.reason


def feed_bytewise(conn: ServerConnection, data: bytes) -> list[object]:
    out: list[object] = []
    for i in range(len(data)):
        out += conn.receive_data(data[i:i + 1])
    return out


# client message builders
def set_pixel_format(pf: PixelFormat) -> bytes:
    return b"\x00\x00\x00\x00" + pf.pack()


def set_encodings(*encs: int) -> bytes:
    return struct.pack(f">BBH{len(encs)}i", 2, 0, len(encs), *encs)


def fbur(incremental: int, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 3, incremental, x, y, w, h)


def key_event(down: int, keysym: int) -> bytes:
    return struct.pack(">BBxxI", 4, down, keysym)


def pointer_event(mask: int, x: int, y: int) -> bytes:
    return struct.pack(">BBHH", 5, mask, x, y)


def cut_text(text: bytes, length: int | None = None) -> bytes:
    return struct.pack(">Bxxxi", 6, len(text) if length is None else length) + text


def qemu_key(down: int, keysym: int, keycode: int) -> bytes:
    return struct.pack(">BBHII", 255, 0, down, keysym, keycode)


def enable_cu(enable: int, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 150, enable, x, y, w, h)


def client_fence(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxIB", 248, flags, len(payload)) + payload


def set_desktop_size(w: int, h: int, screens: Sequence[tuple[int, ...]]) -> bytes:
    return (struct.pack(">BxHHBx", 251, w, h, len(screens))
            + b"".join(struct.pack(">IHHHHI", *s) for s in screens))


def server_fence(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxIB", 248, flags, len(payload)) + payload


# -- versions and security ----------------------------------------------------------------------

def test_server_speaks_first_with_highest_version() -> None:
    assert connect().data_to_send() == b"RFB 003.008\n"
    conn = connect(config(versions=((3, 3), (3, 7))))
    assert conn.data_to_send() == b"RFB 003.007\n"
    assert conn.state is ConnState.VERSION


def test_v38_none_full_handshake() -> None:
    conn = connect()
    conn.data_to_send()
    assert conn.receive_data(b"RFB 003.008\n") == []
    assert conn.data_to_send() == b"\x01\x01"  # one security type: None
    assert conn.state is ConnState.SECURITY
    assert conn.receive_data(b"\x01") == []
    assert conn.data_to_send() == u32(0)  # 3.8 sends SecurityResult even for None
    assert conn.receive_data(b"\x00") == [ev.ClientInit(False)]
    assert conn.data_to_send() == server_init()
    assert conn.state is ConnState.NORMAL
    assert (conn.version, conn.security_type, conn.shared) == ((3, 8), C.SEC_NONE, False)


def test_v37_none_has_no_security_result() -> None:
    conn = connect()
    conn.data_to_send()
    events = conn.receive_data(b"RFB 003.007\n\x01\x01")
    assert events == [ev.ClientInit(True)]
    assert conn.data_to_send() == b"\x01\x01" + server_init()
    assert conn.version == (3, 7)


def test_v33_none_server_chooses() -> None:
    conn = connect(config(security_types=[C.SEC_VENCRYPT, C.SEC_NONE],
                          vencrypt_subtypes=[C.VENCRYPT_PLAIN], plain_auth=lambda u, p: True))
    conn.data_to_send()
    events = conn.receive_data(b"RFB 003.003\n\x01")
    assert events == [ev.ClientInit(True)]
    # U32 security type 1 (VeNCrypt skipped: not expressible in 3.3), then ServerInit.
    assert conn.data_to_send() == u32(1) + server_init()


def test_v33_vnc_auth_success_and_failure() -> None:
    cfg = config(security_types=[C.SEC_VNC_AUTH], password=PASSWORD)
    conn = connect(cfg)
    conn.data_to_send()
    conn.receive_data(b"RFB 003.003\n")
    assert conn.data_to_send() == u32(2) + CHALLENGE
    assert conn.state is ConnState.VNC_AUTH
    events = conn.receive_data(vnc_auth_response(PASSWORD, CHALLENGE) + b"\x01")
    assert events == [ev.ClientInit(True)]
    assert conn.data_to_send() == u32(0) + server_init()

    conn = connect(cfg)
    conn.data_to_send()
    conn.receive_data(b"RFB 003.003\n")
    conn.data_to_send()
    events = conn.receive_data(vnc_auth_response(b"wrong", CHALLENGE))
    assert isinstance(events[0], ev.AuthFailed)
    closed_with(events, conn)
    assert conn.data_to_send() == u32(1)  # 3.3: no reason string


@pytest.mark.parametrize("client_version,expected", [
    (b"RFB 003.005\n", (3, 3)),   # rfbproto: 3.5 must be treated as 3.3
    (b"RFB 003.006\n", (3, 3)),
    (b"RFB 003.889\n", (3, 8)),   # Apple: 3.8 framing
    (b"RFB 003.007\n", (3, 7)),
])
def test_unofficial_minor_versions(client_version: bytes, expected: tuple[int, int]) -> None:
    conn = connect()
    conn.data_to_send()
    conn.receive_data(client_version)
    assert conn.version == expected
    assert conn.data_to_send() == (u32(1) if expected == (3, 3) else b"\x01\x01")


def test_unsupported_major_version_gets_reason() -> None:
    conn = connect()
    conn.data_to_send()
    events = conn.receive_data(b"RFB 004.001\n")
    reason = closed_with(events, conn)
    out = conn.data_to_send()
    assert out[0] == 0  # 3.7+ framing: zero security types, then the reason
    (n,) = struct.unpack(">I", out[1:5])
    assert out[5:] == reason.encode() and n == len(reason) and "4.1" in reason


def test_version_not_accepted_uses_client_framing() -> None:
    conn = connect(config(versions=((3, 8),)))
    conn.data_to_send()
    events = conn.receive_data(b"RFB 003.003\n")
    reason = closed_with(events, conn)
    out = conn.data_to_send()
    assert out[:4] == u32(0)  # 3.3: security type 0 = failed
    assert out[8:] == reason.encode()


def test_v33_without_usable_type_fails_with_reason() -> None:
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_PLAIN],
                 plain_auth=lambda u, p: True)
    conn = connect(cfg)
    conn.data_to_send()
    reason = closed_with(conn.receive_data(b"RFB 003.003\n"), conn)
    assert "3.3" in reason
    out = conn.data_to_send()
    assert out[:4] == u32(0) and out[8:] == reason.encode()


def test_garbage_instead_of_version_fails_fast() -> None:
    conn = connect()
    conn.data_to_send()
    # Fails on the first byte that cannot start "RFB ", without waiting for 12 bytes.
    reason = closed_with(conn.receive_data(b"GET"), conn)
    assert "RFB" in reason
    assert conn.data_to_send() == b""
    conn = connect()
    closed_with(conn.receive_data(b"RFB 003.00x\n"), conn)


@pytest.mark.parametrize("version,with_reason", [(b"RFB 003.008\n", True),
                                                 (b"RFB 003.007\n", False)])
def test_unoffered_security_type(version: bytes, with_reason: bool) -> None:
    conn = connect()
    conn.data_to_send()
    conn.receive_data(version)
    conn.data_to_send()
    reason = closed_with(conn.receive_data(b"\x02"), conn)
    out = conn.data_to_send()
    assert out[:4] == u32(1)
    if with_reason:
        assert out[4:8] == u32(len(reason)) and out[8:] == reason.encode()
    else:
        assert out == u32(1)


def vnc_auth_until_challenge(cfg: ServerConfig, version: bytes = b"RFB 003.008\n"
                             ) -> ServerConnection:
    conn = connect(cfg)
    conn.data_to_send()
    conn.receive_data(version + b"\x02")
    assert conn.data_to_send() == bytes((len(cfg.security_types), *cfg.security_types)) \
        + CHALLENGE
    return conn


def test_v38_vnc_auth_success() -> None:
    cfg = config(security_types=[C.SEC_NONE, C.SEC_VNC_AUTH], password=PASSWORD)
    conn = vnc_auth_until_challenge(cfg)
    events = conn.receive_data(vnc_auth_response(PASSWORD, CHALLENGE) + b"\x00")
    assert events == [ev.ClientInit(False)]
    assert conn.data_to_send() == u32(0) + server_init()
    assert conn.security_type == C.SEC_VNC_AUTH


def test_v38_vnc_auth_wrong_password_reason() -> None:
    cfg = config(security_types=[C.SEC_VNC_AUTH], password=PASSWORD)
    conn = vnc_auth_until_challenge(cfg)
    events = conn.receive_data(vnc_auth_response(b"guess", CHALLENGE) + b"\x01")
    assert len(events) == 2 and isinstance(events[0], ev.AuthFailed)
    reason = closed_with(events, conn)
    assert events[0].reason == reason
    assert conn.data_to_send() == u32(1) + u32(len(reason)) + reason.encode()
    assert conn.receive_data(b"more") == []  # closed: nothing more is parsed


def test_vnc_auth_password_truncated_to_8() -> None:
    cfg = config(security_types=[C.SEC_VNC_AUTH], password=b"12345678-ignored")
    conn = vnc_auth_until_challenge(cfg, b"RFB 003.007\n")
    events = conn.receive_data(vnc_auth_response(b"12345678", CHALLENGE) + b"\x01")
    assert events == [ev.ClientInit(True)]


def test_vnc_auth_fresh_challenge_per_connection() -> None:
    cfg = ServerConfig(security_types=[C.SEC_VNC_AUTH], password=PASSWORD)  # os.urandom
    challenges = set()
    for _ in range(3):
        conn = connect(cfg)
        conn.receive_data(b"RFB 003.008\n\x02")
        challenges.add(conn.data_to_send()[-16:])
    assert len(challenges) == 3


def vencrypt_until_subtypes(cfg: ServerConfig) -> ServerConnection:
    conn = connect(cfg)
    conn.data_to_send()
    conn.receive_data(b"RFB 003.008\n" + bytes((C.SEC_VENCRYPT,)))
    types = bytes((len(cfg.security_types), *cfg.security_types))
    assert conn.data_to_send() == types + b"\x00\x02"  # VeNCrypt 0.2
    assert conn.state is ConnState.VENCRYPT_VERSION
    conn.receive_data(b"\x00\x02")
    subs = list(cfg.vencrypt_subtypes)
    assert conn.data_to_send() == b"\x00" + bytes((len(subs),)) + b"".join(map(u32, subs))
    assert conn.state is ConnState.VENCRYPT_SUBTYPE
    return conn


def plain(user: bytes, password: bytes) -> bytes:
    return u32(len(user)) + u32(len(password)) + user + password


def plain_cfg(check: Callable[[str, str], bool] | None = None) -> ServerConfig:
    return config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_PLAIN],
                  plain_auth=check or (lambda u, p: (u, p) == ("alice", "pässword")))


def test_vencrypt_plain_success() -> None:
    conn = vencrypt_until_subtypes(plain_cfg())
    events = conn.receive_data(u32(C.VENCRYPT_PLAIN) + plain(b"alice", "pässword".encode())
                               + b"\x01")
    assert events == [ev.ClientInit(True)]
    assert conn.data_to_send() == u32(0) + server_init()  # no accept byte for Plain
    assert (conn.username, conn.security_type, conn.vencrypt_subtype) == (
        "alice", C.SEC_VENCRYPT, C.VENCRYPT_PLAIN)
    assert not conn.tls_active


@pytest.mark.parametrize("creds", [plain(b"alice", b"nope"), plain(b"bob", "pässword".encode()),
                                   plain(b"alice", b"\xff\xfe")])
def test_vencrypt_plain_bad_credentials(creds: bytes) -> None:
    conn = vencrypt_until_subtypes(plain_cfg())
    events = conn.receive_data(u32(C.VENCRYPT_PLAIN) + creds)
    assert isinstance(events[0], ev.AuthFailed)
    reason = closed_with(events, conn)
    assert conn.data_to_send() == u32(1) + u32(len(reason)) + reason.encode()
    assert conn.username is None


def test_vencrypt_plain_backend_exception_is_a_refusal() -> None:
    def broken(user: str, password: str) -> bool:
        raise RuntimeError("ldap down")

    conn = vencrypt_until_subtypes(plain_cfg(broken))
    events = conn.receive_data(u32(C.VENCRYPT_PLAIN) + plain(b"alice", b"x"))
    assert isinstance(events[0], ev.AuthFailed) and "ldap down" in events[0].reason
    closed_with(events, conn)


def test_vencrypt_plain_length_limit() -> None:
    seen = []
    conn = vencrypt_until_subtypes(plain_cfg(lambda u, p: seen.append(u) is None))
    # Over the limit: refused from the 8-byte header alone, before any buffering.
    events = conn.receive_data(u32(C.VENCRYPT_PLAIN) + u32(PLAIN_MAX_FIELD + 1) + u32(1))
    assert "too long" in closed_with(events, conn)
    assert seen == []
    conn = vencrypt_until_subtypes(plain_cfg(lambda u, p: seen.append(u) is None))
    user = b"u" * PLAIN_MAX_FIELD
    events = conn.receive_data(u32(C.VENCRYPT_PLAIN) + plain(user, b"p" * PLAIN_MAX_FIELD))
    assert events == [] and conn.state is ConnState.INIT and seen == [user.decode()]


def test_vencrypt_bad_version() -> None:
    cfg = plain_cfg()
    conn = connect(cfg)
    conn.data_to_send()
    events = conn.receive_data(b"RFB 003.008\n\x13\x00\x01")
    assert "VeNCrypt version 0.1" in closed_with(events, conn)
    assert conn.data_to_send() == b"\x01\x13\x00\x02\xff"


def test_vencrypt_refused_subtype() -> None:
    conn = vencrypt_until_subtypes(plain_cfg())
    events = conn.receive_data(u32(C.VENCRYPT_X509PLAIN))
    assert isinstance(events[0], ev.AuthFailed)
    assert str(C.VENCRYPT_X509PLAIN) in closed_with(events, conn)
    assert conn.data_to_send() == b"\x00"


# -- TLS (VeNCrypt TLSNone / X509None / X509Vnc) through Python's ssl in memory ---------------

class TlsClient:
    """The viewer side of a TLS session over the server's raw bytes."""

    def __init__(self, ctx: ssl.SSLContext, hostname: str | None = None) -> None:
        self.inc, self.outg = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.outg, server_hostname=hostname)
        self.done = False
        self.plain = bytearray()

    def step(self, from_server: bytes) -> bytes:
        """Feed server bytes, return bytes for the server."""
        if from_server:
            self.inc.write(from_server)
        if not self.done:
            try:
                self.obj.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass
        if self.done:
            while True:
                try:
                    chunk = self.obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    break
                self.plain += chunk
        return self.outg.read()

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outg.read()


def run_tls(conn: ServerConnection, client: TlsClient) -> list[object]:
    """Pump the handshake until both sides are quiet; return the server's events."""
    events: list[object] = []
    to_client = b""
    for _ in range(30):
        to_server = client.step(to_client)
        if to_server:
            events += conn.receive_data(to_server)
        to_client = conn.data_to_send()
        if not to_server and not to_client and client.done:
            return events
    raise AssertionError("TLS exchange did not settle")


def anon_client() -> TlsClient:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("aNULL:@SECLEVEL=0")
    return TlsClient(ctx)


@pytest.fixture(scope="module")
def x509_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, bytes]:
    """A self-signed localhost server certificate: (server context, CA PEM for the client)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("x509")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (d / "cert.pem").write_bytes(cert_pem)
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx, cert_pem


def x509_client(ca_pem: bytes) -> TlsClient:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    return TlsClient(ctx, "localhost")


def tls_session(cfg: ServerConfig, sub: int, client: TlsClient
                ) -> tuple[ServerConnection, list[object]]:
    conn = vencrypt_until_subtypes(cfg)
    assert conn.receive_data(u32(sub)) == []
    assert conn.data_to_send() == b"\x01"  # accept, the last clear-text byte
    assert conn.state is ConnState.TLS_HANDSHAKE and conn.tls_active
    events = run_tls(conn, client)
    return conn, events


def test_vencrypt_tlsnone_session() -> None:
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_TLSNONE],
                 tls_anon_context=make_anon_tls_context())
    client = anon_client()
    conn, events = tls_session(cfg, C.VENCRYPT_TLSNONE, client)
    assert events == []
    assert bytes(client.plain) == u32(0)  # SecurityResult OK, inside TLS
    assert conn.state is ConnState.INIT
    assert conn.tls_cipher is not None and conn.tls_cipher[0].startswith(("ADH", "AECDH"))
    client.plain.clear()
    wire = client.send(b"\x01" + key_event(1, 0x61))
    assert b"\x04\x01\x00\x00" not in wire  # encrypted on the wire
    events = conn.receive_data(wire)
    assert events == [ev.ClientInit(True), KeyInput(True, 0x61)]
    server_out = conn.data_to_send()
    assert b"dom7" not in server_out  # ServerInit went out encrypted
    client.step(server_out)
    assert bytes(client.plain) == server_init()
    # Server-side messages go through TLS too.
    client.plain.clear()
    conn.send_bell()
    client.step(conn.data_to_send())
    assert bytes(client.plain) == b"\x02"


def test_vencrypt_tls_records_split_at_every_byte() -> None:
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_TLSNONE],
                 tls_anon_context=make_anon_tls_context())
    client = anon_client()
    conn = vencrypt_until_subtypes(cfg)
    hello = client.step(b"")
    # Subtype choice and the ClientHello in one chunk (pipelining), then byte by byte.
    conn.receive_data(u32(C.VENCRYPT_TLSNONE) + hello[:1])
    assert conn.data_to_send() == b"\x01"
    assert feed_bytewise(conn, hello[1:]) == []
    events = run_tls(conn, client)
    assert events == [] and conn.state is ConnState.INIT
    wire = client.send(b"\x00" + fbur(0, 0, 0, 10, 10))
    events = feed_bytewise(conn, wire)
    assert events == [ev.ClientInit(False), ev.FramebufferUpdateRequest(False, Rect(0, 0, 10, 10))]


def test_vencrypt_x509none_session(x509_pair: tuple[ssl.SSLContext, bytes]) -> None:
    ctx, ca = x509_pair
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_X509NONE],
                 tls_x509_context=ctx)
    client = x509_client(ca)
    conn, events = tls_session(cfg, C.VENCRYPT_X509NONE, client)
    assert events == [] and bytes(client.plain) == u32(0)
    assert client.obj.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    # TLS 1.3 without session tickets: tickets in the SecurityResult flight hang TigerVNC 1.12.
    assert client.obj.version() == "TLSv1.3"
    assert ctx.num_tickets == 0
    assert client.obj.session is not None and not client.obj.session.has_ticket
    events = conn.receive_data(client.send(b"\x01"))
    assert events == [ev.ClientInit(True)]


@pytest.mark.parametrize("password,ok", [(PASSWORD, True), (b"wrong", False)])
def test_vencrypt_x509vnc_session(x509_pair: tuple[ssl.SSLContext, bytes], password: bytes,
                                  ok: bool) -> None:
    ctx, ca = x509_pair
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_X509VNC],
                 tls_x509_context=ctx, password=PASSWORD)
    client = x509_client(ca)
    conn, events = tls_session(cfg, C.VENCRYPT_X509VNC, client)
    assert events == [] and bytes(client.plain) == CHALLENGE  # challenge inside TLS
    assert conn.state is ConnState.VNC_AUTH
    client.plain.clear()
    events = conn.receive_data(client.send(vnc_auth_response(password, CHALLENGE) + b"\x01"))
    try:
        client.step(conn.data_to_send())
    except ssl.SSLZeroReturnError:
        pass
    if ok:
        assert events == [ev.ClientInit(True)]
        assert bytes(client.plain) == u32(0) + server_init()
    else:
        assert isinstance(events[0], ev.AuthFailed)
        reason = closed_with(events, conn)
        assert bytes(client.plain) == u32(1) + u32(len(reason)) + reason.encode()


def test_tls_garbage_handshake_closes() -> None:
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_TLSNONE],
                 tls_anon_context=make_anon_tls_context())
    conn = vencrypt_until_subtypes(cfg)
    events = conn.receive_data(u32(C.VENCRYPT_TLSNONE) + b"\x16\x03\x01\x00\x05hello-not-tls")
    assert "TLS" in closed_with(events, conn)


def test_tls_client_close_notify_is_orderly_eof() -> None:
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_TLSNONE],
                 tls_anon_context=make_anon_tls_context())
    client = anon_client()
    conn, _ = tls_session(cfg, C.VENCRYPT_TLSNONE, client)
    conn.receive_data(client.send(b"\x01"))
    try:
        client.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    events = conn.receive_data(client.outg.read())
    assert closed_with(events, conn, error=False)


def test_tls_server_close_sends_close_notify() -> None:
    cfg = config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_TLSNONE],
                 tls_anon_context=make_anon_tls_context())
    client = anon_client()
    conn, _ = tls_session(cfg, C.VENCRYPT_TLSNONE, client)
    conn.receive_data(client.send(b"\x01"))
    client.inc.write(conn.data_to_send())
    assert client.obj.read(100000) == server_init()
    with pytest.raises(ssl.SSLWantReadError):  # open session, nothing more yet
        client.obj.read(100000)
    conn.close("bye")
    client.inc.write(conn.data_to_send())
    assert client.obj.read(100000) == b""  # Python's ssl: b"" = close_notify received


# -- close() during the handshake ---------------------------------------------------------------

@pytest.mark.parametrize("version,expected", [
    (b"RFB 003.008\n", u32(1) + u32(8) + b"shutdown"),
    (b"RFB 003.007\n", u32(1)),
])
def test_close_during_auth_sends_failure(version: bytes, expected: bytes) -> None:
    cfg = config(security_types=[C.SEC_VNC_AUTH], password=PASSWORD)
    conn = vnc_auth_until_challenge(cfg, version)
    conn.close("shutdown")
    assert conn.state is ConnState.CLOSED
    assert conn.data_to_send() == expected
    conn.close("again")  # idempotent
    assert conn.data_to_send() == b""
    assert conn.receive_data(vnc_auth_response(PASSWORD, CHALLENGE)) == []


def test_close_before_version_sends_nothing_more() -> None:
    conn = connect()
    conn.close("server full")
    assert conn.data_to_send() == b"RFB 003.008\n"
    assert conn.state is ConnState.CLOSED


# -- normal messages ----------------------------------------------------------------------------

def test_set_pixel_format_valid_and_invalid() -> None:
    conn = normal()
    rgb565 = PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)
    assert conn.receive_data(set_pixel_format(rgb565)) == [ev.SetPixelFormat(rgb565)]
    assert conn.pixel_format == rgb565
    colour_map = PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0)
    reason = closed_with(conn.receive_data(set_pixel_format(colour_map)), conn)
    assert "colour-map" in reason
    assert conn.pixel_format == rgb565


def test_set_encodings_flags_and_levels() -> None:
    conn = normal()
    assert not (conn.supports_desktop_size or conn.supports_cursor or conn.supports_last_rect)
    encs = (C.ENC_TIGHT, C.ENC_ZRLE, C.ENC_RAW, -30, -25, -254, C.PSEUDO_DESKTOP_SIZE,
            C.PSEUDO_EXTENDED_DESKTOP_SIZE, C.PSEUDO_LAST_RECT, C.PSEUDO_CURSOR,
            C.PSEUDO_QEMU_LED_STATE)
    assert conn.receive_data(set_encodings(*encs)) == [ev.SetEncodings(encs)]
    assert conn.encodings == encs
    assert (conn.quality, conn.compression) == (7, 2)  # last of each range wins (QEMU, TigerVNC)
    assert conn.supports_desktop_size and conn.supports_ext_desktop_size
    assert conn.supports_last_rect and conn.supports_cursor and conn.supports_led_state
    assert not (conn.supports_fence or conn.supports_continuous_updates
                or conn.supports_ext_key_event)
    assert conn.data_to_send() == b""  # none of these needs an advertisement
    conn.receive_data(set_encodings(C.ENC_RAW, -23, -247))
    assert (conn.quality, conn.compression) == (9, 9)
    assert not conn.supports_cursor
    conn.receive_data(set_encodings())
    assert (conn.encodings, conn.quality, conn.compression) == ((), None, None)


def test_set_encodings_limit() -> None:
    conn = normal(config(max_encodings=4))
    assert conn.receive_data(set_encodings(0, 1, 2, 5)) == [ev.SetEncodings((0, 1, 2, 5))]
    # Refused from the 4-byte header, before the 5 entries arrive.
    reason = closed_with(conn.receive_data(set_encodings(0, 1, 2, 5, 16)[:4]), conn)
    assert "5 encodings" in reason


def test_ext_key_event_ack_sent_once_when_newly_requested() -> None:
    conn = normal()
    conn.receive_data(set_encodings(C.ENC_RAW, C.PSEUDO_QEMU_EXTENDED_KEY_EVENT))
    ack = b"\x00\x00" + struct.pack(">H", 1) + rect_header(0, 0, 640, 480, -258)
    assert conn.data_to_send() == ack
    assert conn.supports_ext_key_event
    conn.receive_data(set_encodings(C.PSEUDO_QEMU_EXTENDED_KEY_EVENT, C.ENC_HEXTILE))
    assert conn.data_to_send() == b""  # still present: no second ack
    conn.receive_data(set_encodings(C.ENC_RAW))
    conn.receive_data(set_encodings(C.PSEUDO_QEMU_EXTENDED_KEY_EVENT))
    assert conn.data_to_send() == ack


def test_fence_advertised_and_requests_answered() -> None:
    conn = normal()
    conn.receive_data(set_encodings(C.PSEUDO_FENCE))
    assert conn.data_to_send() == server_fence(C.FENCE_REQUEST, b"")
    assert conn.supports_fence
    # The client's response to our request: consumed quietly.
    assert conn.receive_data(client_fence(0, b"")) == []
    assert conn.data_to_send() == b""
    # A client request: same payload, Request bit cleared, unknown bits masked.
    flags = C.FENCE_REQUEST | C.FENCE_BLOCK_BEFORE | C.FENCE_SYNC_NEXT | (1 << 9)
    assert conn.receive_data(client_fence(flags, b"abc" * 21)) == []
    assert conn.data_to_send() == server_fence(C.FENCE_BLOCK_BEFORE | C.FENCE_SYNC_NEXT,
                                               b"abc" * 21)
    reason = closed_with(conn.receive_data(client_fence(C.FENCE_REQUEST, b"x" * 65)), conn)
    assert "65" in reason


def test_continuous_updates_advertise_enable_disable() -> None:
    conn = normal()
    reason = closed_with(conn.receive_data(enable_cu(1, 0, 0, 10, 10)), conn)
    assert "ContinuousUpdates" in reason

    conn = normal()
    conn.receive_data(set_encodings(C.PSEUDO_CONTINUOUS_UPDATES))
    assert conn.data_to_send() == b"\x96"  # EndOfContinuousUpdates = "supported"
    conn.receive_data(set_encodings(C.PSEUDO_CONTINUOUS_UPDATES, C.ENC_RAW))
    assert conn.data_to_send() == b""
    events = conn.receive_data(enable_cu(1, 600, 400, 100, 100))
    assert events == [ev.EnableContinuousUpdates(True, Rect(600, 400, 40, 80))]
    assert conn.continuous_updates == Rect(600, 400, 40, 80)
    assert conn.data_to_send() == b""
    conn.set_size(620, 450)
    assert conn.continuous_updates == Rect(600, 400, 20, 50)
    events = conn.receive_data(enable_cu(0, 0, 0, 0, 0))
    assert events == [ev.EnableContinuousUpdates(False, Rect(0, 0, 0, 0))]
    assert conn.continuous_updates is None
    assert conn.data_to_send() == b"\x96"


def test_framebuffer_update_request_is_cropped() -> None:
    conn = normal()
    events = conn.receive_data(fbur(1, 600, 470, 100, 100) + fbur(0, 0, 0, 640, 480)
                               + fbur(1, 700, 10, 5, 5))
    assert events == [
        ev.FramebufferUpdateRequest(True, Rect(600, 470, 40, 10)),
        ev.FramebufferUpdateRequest(False, Rect(0, 0, 640, 480)),
        ev.FramebufferUpdateRequest(True, Rect(640, 10, 0, 5)),  # outside: empty, not an error
    ]
    assert conn.state is ConnState.NORMAL
    conn.set_size(100, 100)
    assert conn.receive_data(fbur(0, 0, 0, 640, 480)) == [
        ev.FramebufferUpdateRequest(False, Rect(0, 0, 100, 100))]


def test_key_and_pointer_events() -> None:
    conn = normal()
    events = conn.receive_data(key_event(1, 0xFF0D) + key_event(0, 0xFF0D)
                               + pointer_event(0x09, 10, 20) + pointer_event(0, 5000, 5000))
    assert events == [KeyInput(True, 0xFF0D, None), KeyInput(False, 0xFF0D, None),
                      PointerInput(10, 20, 0x09), PointerInput(639, 479, 0)]


def test_qemu_extended_key_event() -> None:
    conn = normal()
    events = conn.receive_data(qemu_key(1, 0x61, 0x1E) + qemu_key(0, 0xFF51, 0xCB)
                               + qemu_key(1, 0x62, 0))
    assert events == [KeyInput(True, 0x61, 0x1E), KeyInput(False, 0xFF51, 0xCB),
                      KeyInput(True, 0x62, None)]
    reason = closed_with(conn.receive_data(b"\xff\x01\x00\x00"), conn)  # QEMU audio: unknown
    assert "sub-type 1" in reason


def test_client_cut_text_and_limits() -> None:
    conn = normal(config(max_cut_text=16))
    assert conn.receive_data(cut_text(b"hello\nworld")) == [ev.ClientCutText(b"hello\nworld")]
    assert conn.receive_data(cut_text(b"")) == [ev.ClientCutText(b"")]
    # Extended clipboard (negative length): consumed without an event, stream stays in sync.
    ext = cut_text(u32(1 << 24) + b"\x00" * 4, length=-8)
    assert conn.receive_data(ext + key_event(1, 0x41)) == [KeyInput(True, 0x41)]
    reason = closed_with(conn.receive_data(cut_text(b"", length=17)), conn)
    assert "17 bytes" in reason
    for bad in (cut_text(b"", length=-17), cut_text(b"", length=-(1 << 31)),
                cut_text(b"ab", length=-2)):
        conn = normal(config(max_cut_text=16))
        closed_with(conn.receive_data(bad), conn)


def test_set_desktop_size() -> None:
    conn = normal(config(max_screens=2))
    msg = set_desktop_size(800, 600, [(7, 0, 0, 800, 600, 0)])
    assert conn.receive_data(msg) == [
        ev.SetDesktopSize(800, 600, (ev.Screen(7, 0, 0, 800, 600, 0),))]
    two = set_desktop_size(1600, 600, [(1, 0, 0, 800, 600, 0), (2, 800, 0, 800, 600, 5)])
    assert conn.receive_data(two)[0].screens[1] == ev.Screen(2, 800, 0, 800, 600, 5)
    reason = closed_with(conn.receive_data(set_desktop_size(1, 1, [(0, 0, 0, 1, 1, 0)] * 3)[:8]),
                         conn)
    assert "3 screens" in reason


@pytest.mark.parametrize("mtype", [1, 7, 100, 127, 149, 249, 250, 252, 253, 254])
def test_unknown_message_types_close(mtype: int) -> None:
    conn = normal()
    reason = closed_with(conn.receive_data(bytes((mtype,)) + b"\x00" * 30), conn)
    assert str(mtype) in reason


def test_eof() -> None:
    conn = normal()
    assert closed_with(conn.receive_data(b""), conn, error=False)
    conn = normal()
    conn.receive_data(key_event(1, 0x41)[:3])
    assert "inside a message" in closed_with(conn.receive_data(b""), conn)
    conn = connect()
    assert "during version" in closed_with(conn.receive_data(b""), conn, error=False)
    assert conn.receive_data(b"") == []


def full_session() -> bytes:
    rgb565 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
    return (b"RFB 003.008\n\x02" + vnc_auth_response(PASSWORD, CHALLENGE) + b"\x01"
            + set_pixel_format(rgb565)
            + set_encodings(C.ENC_ZRLE, C.PSEUDO_QEMU_EXTENDED_KEY_EVENT, C.PSEUDO_FENCE,
                            C.PSEUDO_CONTINUOUS_UPDATES, -28)
            + fbur(0, 0, 0, 640, 480) + key_event(1, 0x41) + qemu_key(0, 0x41, 0x1E)
            + pointer_event(1, 3, 4) + cut_text(b"clip") + cut_text(b"x" * 6, length=-6)
            + client_fence(C.FENCE_REQUEST | C.FENCE_BLOCK_AFTER, b"pl")
            + enable_cu(1, 0, 0, 320, 240) + enable_cu(0, 0, 0, 0, 0)
            + set_desktop_size(800, 600, [(0, 0, 0, 800, 600, 0)]) + fbur(1, 0, 0, 1, 1))


def test_split_at_every_byte_equals_one_chunk() -> None:
    cfg = config(security_types=[C.SEC_NONE, C.SEC_VNC_AUTH], password=PASSWORD)
    data = full_session()
    whole = connect(cfg)
    events_whole = whole.receive_data(data)
    out_whole = whole.data_to_send()
    split = connect(cfg)
    events_split = feed_bytewise(split, data)
    out_split = split.data_to_send()
    assert events_whole == events_split
    assert out_whole == out_split
    assert len(events_whole) == 12 and split.state is ConnState.NORMAL
    assert events_whole[0] == ev.ClientInit(True)
    assert events_whole[-1] == ev.FramebufferUpdateRequest(True, Rect(0, 0, 1, 1))
    # Every pair of chunk boundaries too (a coarser sweep keeps this fast).
    for cut1 in range(0, len(data), 7):
        for cut2 in range(cut1, len(data), 11):
            conn = connect(cfg)
            evs = []
            for chunk in (data[:cut1], data[cut1:cut2], data[cut2:]):
                if chunk:  # b"" would mean EOF
                    evs += conn.receive_data(chunk)
            assert evs == events_whole


# -- server -> client API -----------------------------------------------------------------------

def test_server_messages_wire_format() -> None:
    conn = normal()
    r1 = rect_header(1, 2, 3, 4, C.ENC_RAW) + b"\x00" * 48
    conn.send_framebuffer_update([r1, last_rect_rect()])
    assert conn.data_to_send() == b"\x00\x00\x00\x02" + r1 + rect_header(0, 0, 0, 0, -224)
    conn.send_framebuffer_update([])
    assert conn.data_to_send() == b"\x00\x00\x00\x00"
    conn.send_bell()
    conn.send_server_cut_text(b"abc")
    conn.send_end_of_continuous_updates()
    conn.send_fence(C.FENCE_REQUEST | C.FENCE_SYNC_NEXT, b"xy")
    assert conn.data_to_send() == (b"\x02" + b"\x03\x00\x00\x00" + u32(3) + b"abc" + b"\x96"
                                   + b"\xf8\x00\x00\x00\x80\x00\x00\x04\x02xy")


def test_server_api_misuse_raises() -> None:
    conn = connect()
    with pytest.raises(LocalProtocolError):
        conn.send_bell()
    with pytest.raises(LocalProtocolError):
        conn.send_framebuffer_update([])
    conn = normal()
    with pytest.raises(LocalProtocolError):
        conn.send_framebuffer_update([b"short"])
    with pytest.raises(LocalProtocolError):
        conn.send_fence(0, b"x" * 65)
    with pytest.raises(LocalProtocolError):
        conn.set_size(70000, 10)
    conn.close("done")
    with pytest.raises(LocalProtocolError):
        conn.send_server_cut_text(b"x")


def test_pseudo_rect_builders() -> None:
    assert desktop_size_rect(800, 600) == struct.pack(">HHHHi", 0, 0, 800, 600, -223)
    eds = extended_desktop_size_rect(1, 3, 800, 600)
    assert eds == (struct.pack(">HHHHi", 1, 3, 800, 600, -308) + b"\x01\x00\x00\x00"
                   + struct.pack(">IHHHHI", 0, 0, 0, 800, 600, 0))
    two = extended_desktop_size_rect(0, 0, 10, 10, [ev.Screen(5, 0, 0, 5, 10, 0),
                                                    (6, 5, 0, 5, 10, 1)])
    assert two[12] == 2 and len(two) == 12 + 4 + 32
    assert led_state_rect(C.LED_CAPS_LOCK | C.LED_NUM_LOCK) == rect_header(
        0, 0, 0, 0, -261) + b"\x06"
    assert ext_key_event_ack_rect() == rect_header(0, 0, 0, 0, -258)
    pixels = bytes(range(2 * 3 * 4))
    mask = b"\xc0\x80\x40"
    assert cursor_rect(1, 2, 2, 3, pixels, mask) == rect_header(1, 2, 2, 3, -239) + pixels + mask
    with pytest.raises(LocalProtocolError):
        cursor_rect(0, 0, 2, 3, pixels, b"\x00")  # mask too short
    with pytest.raises(LocalProtocolError):
        cursor_rect(0, 0, 2, 3, pixels[:-1], mask)  # pixels not a whole bpp
    with pytest.raises(LocalProtocolError):
        rect_header(-1, 0, 0, 0, 0)
    with pytest.raises(LocalProtocolError):
        led_state_rect(256)


def test_config_checked() -> None:
    with pytest.raises(ValueError, match="password"):
        connect(config(security_types=[C.SEC_VNC_AUTH]))
    with pytest.raises(ValueError, match="tls_anon_context"):
        connect(config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_TLSNONE]))
    with pytest.raises(ValueError, match="not supported"):
        connect(config(security_types=[C.SEC_TIGHT]))
    with pytest.raises(ValueError, match="not supported"):
        connect(config(security_types=[C.SEC_VENCRYPT], vencrypt_subtypes=[C.VENCRYPT_TLSPLAIN]))
    with pytest.raises(ValueError, match="versions"):
        connect(config(versions=((3, 5),)))
    with pytest.raises(ValueError):
        connect(width=65536)


def test_advertisements_precede_the_ext_key_ack_update() -> None:
    """TigerVNC enables continuous updates at the end of its first FramebufferUpdate only if
    EndOfContinuousUpdates arrived before it: the ack (an update) must come last."""
    conn = normal()
    conn.receive_data(set_encodings(C.PSEUDO_QEMU_EXTENDED_KEY_EVENT, C.PSEUDO_FENCE,
                                    C.PSEUDO_CONTINUOUS_UPDATES))
    out = conn.data_to_send()
    assert out[0] == C.MSG_END_OF_CONTINUOUS_UPDATES
    assert out[1] == C.MSG_SERVER_FENCE
    assert out[1 + 9] == C.MSG_FRAMEBUFFER_UPDATE


def test_view_only_password_admits_a_view_only_viewer() -> None:
    from dmore_nova.rm_vm.rfb.security import vnc_auth_response

    for pw, view_only in ((b"full", False), (b"look", True)):
        cfg = ServerConfig(security_types=[C.SEC_VNC_AUTH], password=b"full",
                           view_only_password=b"look", randbytes=lambda n: b"\x07" * n)
        conn = ServerConnection(cfg, width=64, height=48, name="t")
        conn.receive_data(b"RFB 003.008\n")
        conn.receive_data(bytes([C.SEC_VNC_AUTH]))
        conn.data_to_send()
        conn.receive_data(vnc_auth_response(pw, b"\x07" * 16))
        assert conn.data_to_send() == b"\0\0\0\0"  # SecurityResult OK
        assert conn.view_only is view_only
