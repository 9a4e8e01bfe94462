"""VNC Authentication's DES, the key quirk, the bundled DH group and the TLSNone context."""

from __future__ import annotations

import base64
import os
import pathlib
import random
import ssl
import subprocess

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, modes

try:  # cryptography >= 43 moved the legacy ciphers here
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

from dmore_nova.rm_vm.rfb.security import (
    FFDHE2048_PEM,
    des_encrypt_block,
    make_anon_tls_context,
    make_x509_tls_context,
    vnc_auth_check,
    vnc_auth_key,
    vnc_auth_response,
)


def reference_des(key: bytes, block: bytes) -> bytes:
    """Single DES via cryptography: 3DES with K1 = K2 = K3 degenerates to single DES."""
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def reverse_bits(b: int) -> int:
    out = 0
    for i in range(8):
        if b & (1 << i):
            out |= 1 << (7 - i)
    return out


def test_des_fips_known_answer() -> None:
    # The classic worked example (key 133457799BBCDFF1) and the NBS all-zero/all-one vectors.
    assert des_encrypt_block(bytes.fromhex("133457799BBCDFF1"),
                             bytes.fromhex("0123456789ABCDEF")).hex() == "85e813540f0ab405"
    assert des_encrypt_block(bytes(8), bytes(8)).hex() == "8ca64de9c1b123a7"
    assert des_encrypt_block(b"\xff" * 8, b"\xff" * 8).hex() == "7359b2163e4edc58"


def test_des_matches_cryptography_random() -> None:
    rng = random.Random(1234)
    keys = [bytes(8), b"\xff" * 8, bytes.fromhex("0101010101010101"),
            bytes.fromhex("FEFEFEFEFEFEFEFE"), bytes.fromhex("1F1F1F1F0E0E0E0E")]
    keys += [rng.randbytes(8) for _ in range(300)]
    for key in keys:
        block = rng.randbytes(8)
        assert des_encrypt_block(key, block) == reference_des(key, block), key.hex()


def test_des_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        des_encrypt_block(b"short", bytes(8))
    with pytest.raises(ValueError):
        des_encrypt_block(bytes(8), bytes(9))


@pytest.mark.parametrize("password", [b"", b"a", b"secret", b"12345678", b"longer than 8 bytes",
                                      bytes(range(250, 256)) + b"\x00\x7f"])
def test_vnc_auth_response_matches_reference(password: bytes) -> None:
    challenge = os.urandom(16)
    key = bytes(reverse_bits(b) for b in password[:8].ljust(8, b"\0"))
    assert vnc_auth_key(password) == key
    expected = reference_des(key, challenge[:8]) + reference_des(key, challenge[8:])
    assert vnc_auth_response(password, challenge) == expected
    assert vnc_auth_check(password, challenge, expected)


def test_vnc_auth_uses_only_first_8_bytes() -> None:
    challenge = bytes(range(16))
    assert vnc_auth_response(b"abcdefghXYZ", challenge) == vnc_auth_response(b"abcdefgh",
                                                                             challenge)
    assert vnc_auth_response(b"abcdefgh", challenge) != vnc_auth_response(b"abcdefgi", challenge)


def test_vnc_auth_check_rejects() -> None:
    challenge = os.urandom(16)
    good = vnc_auth_response(b"pw", challenge)
    assert not vnc_auth_check(b"pw2", challenge, good)
    assert not vnc_auth_check(b"pw", challenge, good[:15])
    assert not vnc_auth_check(b"pw", challenge, bytes(16))
    with pytest.raises(ValueError):
        vnc_auth_response(b"pw", b"short")


def rfc7919_ffdhe2048_p() -> int:
    """p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1 (RFC 7919 appendix A.1)."""
    guard = 64
    term = 1 << (1918 + guard)
    total, k = 0, 0
    while term:
        total += term
        k += 1
        term //= k
    e_fixed = total >> guard
    return 2**2048 - 2**1984 + (e_fixed + 560316) * 2**64 - 1


def _der_integers(der: bytes) -> list[int]:
    """Decode PKCS#3 DHparams ``SEQUENCE { INTEGER p, INTEGER g }`` (enough DER for this)."""

    def length(pos: int) -> tuple[int, int]:
        first = der[pos]
        if first < 0x80:
            return first, pos + 1
        n = first & 0x7F
        return int.from_bytes(der[pos + 1:pos + 1 + n], "big"), pos + 1 + n

    assert der[0] == 0x30
    total, pos = length(1)
    assert pos + total == len(der)
    values = []
    while pos < len(der):
        assert der[pos] == 0x02
        n, pos = length(pos + 1)
        values.append(int.from_bytes(der[pos:pos + n], "big"))
        pos += n
    return values


def test_bundled_group_is_rfc7919_ffdhe2048() -> None:
    body = "".join(line for line in FFDHE2048_PEM.splitlines() if not line.startswith("-----"))
    p, g = _der_integers(base64.b64decode(body))
    assert g == 2
    assert p == rfc7919_ffdhe2048_p()
    assert p.bit_length() == 2048


def _pump(server: ssl.SSLObject, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO,
          client: ssl.SSLObject, c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO) -> None:
    for _ in range(20):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        moved = c_out.pending + s_out.pending
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not moved:
            return
    raise AssertionError("handshake did not settle")


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
               ) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out)
    _pump(server, s_in, s_out, client, c_in, c_out)
    return server, client


def anon_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("aNULL:@SECLEVEL=0")
    return ctx


@pytest.mark.parametrize("ciphers", ["ADH:@SECLEVEL=0", "AECDH:@SECLEVEL=0"])
def test_anon_context_negotiates_anonymous_tls12(ciphers: str) -> None:
    client_ctx = anon_client_context()
    client_ctx.set_ciphers(ciphers)
    server, client = _handshake(make_anon_tls_context(), client_ctx)
    name, _proto, _bits = server.cipher()
    assert name.startswith(ciphers.split(":")[0])
    assert client.getpeercert() is None  # nothing to verify: anonymous by design
    assert server.version() == "TLSv1.2"


def test_anon_context_refuses_authenticated_only_client() -> None:
    # A client insisting on certificate-authenticated suites shares no cipher with TLSNone.
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers("ECDHE+AESGCM")
    with pytest.raises(ssl.SSLError):
        _handshake(make_anon_tls_context(), client_ctx)


def test_x509_context_has_no_session_tickets(tmp_path: pathlib.Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    server_ctx = make_x509_tls_context(str(cert), str(key))
    assert server_ctx.num_tickets == 0 and make_anon_tls_context().num_tickets == 0
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cafile=str(cert))
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    _pump(server, s_in, s_out, client, c_in, c_out)
    server.write(b"hi")
    c_in.write(s_out.read())
    assert client.read(10) == b"hi"
    assert client.version() == "TLSv1.3"
    assert not client.session.has_ticket
