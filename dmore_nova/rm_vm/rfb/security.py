"""Cryptographic helpers of RFB security types: VNC Authentication's DES and the TLSNone context.

VNC Authentication (rfbproto 7.2.2) encrypts a 16-byte challenge with single DES in ECB mode,
keyed by the first 8 bytes of the password with *each byte's bits reversed* (a historical quirk
of the original vncauth.c, whose DES took its key bits LSB first).  Single DES is no longer in
``ssl`` and only as "decrepit" TripleDES in ``cryptography``; two blocks per login do not justify
a dependency, so a small FIPS 46-3 implementation lives here, cross-checked in the unit tests
against ``cryptography`` (TripleDES with K1=K2=K3 is single DES).

VeNCrypt TLSNone uses *anonymous* Diffie-Hellman TLS (no certificates; protects against passive
eavesdropping only).  OpenSSL needs explicit finite-field DH parameters for the ADH suites, so the
RFC 7919 ``ffdhe2048`` group is bundled as PEM: a well-known group, no generation at start-up.
"""

from __future__ import annotations

import functools
import hmac
import os
import ssl
import tempfile

__all__ = [
    "FFDHE2048_PEM",
    "des_encrypt_block",
    "make_anon_tls_context",
    "make_x509_tls_context",
    "quiet_tls_context",
    "vnc_auth_check",
    "vnc_auth_key",
    "vnc_auth_response",
]

# -- DES (FIPS 46-3) ----------------------------------------------------------------------------
# Tables use FIPS 46-3 numbering: bit 1 is the most significant bit of the input.

_IP = (58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
       62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
       57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
       61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7)
#: The final permutation is the inverse of IP (computed, so it cannot disagree with it).
_FP = tuple(_IP.index(i) + 1 for i in range(1, 65))
_E = (32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17,
      16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1)
_P = (16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
      2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25)
_PC1 = (57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3,
        60, 52, 44, 36, 63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6,
        61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4)
_PC2 = (14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
        41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29,
        32)
_SHIFTS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)
_SBOX = (
    (14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7,
     0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
     4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0,
     15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13),
    (15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10,
     3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
     0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15,
     13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9),
    (10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8,
     13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
     13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7,
     1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12),
    (7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15,
     13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
     10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4,
     3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14),
    (2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9,
     14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
     4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14,
     11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3),
    (12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11,
     10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
     9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6,
     4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13),
    (4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1,
     13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
     1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2,
     6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12),
    (13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7,
     1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
     7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8,
     2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11),
)


def _permute(value: int, table: tuple[int, ...], width: int) -> int:
    """Pick bits of a ``width``-bit ``value`` in ``table`` order (1 = most significant)."""
    out = 0
    for pos in table:
        out = (out << 1) | ((value >> (width - pos)) & 1)
    return out


@functools.lru_cache(maxsize=8)
def _key_schedule(key: bytes) -> tuple[int, ...]:
    """The sixteen 48-bit round keys of an 8-byte DES key (parity bits ignored).  Cached: a
    server checks every login against the same password."""
    cd = _permute(int.from_bytes(key, "big"), _PC1, 64)
    c, d = cd >> 28, cd & 0xFFFFFFF
    keys = []
    for shift in _SHIFTS:
        c = ((c << shift) | (c >> (28 - shift))) & 0xFFFFFFF
        d = ((d << shift) | (d >> (28 - shift))) & 0xFFFFFFF
        keys.append(_permute((c << 28) | d, _PC2, 56))
    return tuple(keys)


def _byte_tables(table: tuple[int, ...], width: int) -> tuple[tuple[int, ...], ...]:
    """Per input byte, what each of its 256 values contributes to the permuted output: a
    permutation then costs width/8 lookups instead of one step per output bit.  Built from
    single-bit contributions so that importing this module stays cheap."""
    bit_out = [0] * (width + 1)  # FIPS bit number -> output mask
    for out_pos, in_pos in enumerate(table):
        bit_out[in_pos] |= 1 << (len(table) - 1 - out_pos)
    tables = []
    for i in range(width // 8):
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v
            t[v] = t[v & (v - 1)] | bit_out[8 * i + 9 - low.bit_length()]
        tables.append(tuple(t))
    return tuple(tables)


def _permute_fast(value: int, tables: tuple[tuple[int, ...], ...], width: int) -> int:
    out = 0
    shift = width - 8
    for t in tables:
        out |= t[(value >> shift) & 0xFF]
        shift -= 8
    return out


_IP_T = _byte_tables(_IP, 64)
_FP_T = _byte_tables(_FP, 64)
_E_T = _byte_tables(_E, 32)
_P_T = _byte_tables(_P, 32)
#: S-box i followed by P, indexed by the box's 6-bit input (row = outer bits, column = inner).
_SP = tuple(
    tuple(_permute_fast(_SBOX[i][(((six >> 4) & 2) | (six & 1)) * 16 + ((six >> 1) & 0xF)]
                        << (28 - 4 * i), _P_T, 32) for six in range(64))
    for i in range(8))


def _feistel(r: int, subkey: int) -> int:
    x = _permute_fast(r, _E_T, 32) ^ subkey
    return (_SP[0][x >> 42] | _SP[1][(x >> 36) & 0x3F] | _SP[2][(x >> 30) & 0x3F]
            | _SP[3][(x >> 24) & 0x3F] | _SP[4][(x >> 18) & 0x3F] | _SP[5][(x >> 12) & 0x3F]
            | _SP[6][(x >> 6) & 0x3F] | _SP[7][x & 0x3F])


def des_encrypt_block(key: bytes, block: bytes) -> bytes:
    """Encrypt one 8-byte block with single DES (ECB).  Not for anything but VNC Authentication."""
    if len(key) != 8 or len(block) != 8:
        raise ValueError("DES key and block must be 8 bytes")
    x = _permute_fast(int.from_bytes(block, "big"), _IP_T, 64)
    left, right = x >> 32, x & 0xFFFFFFFF
    for subkey in _key_schedule(bytes(key)):  # bytes: hashable for the cache
        left, right = right, left ^ _feistel(right, subkey)
    return _permute_fast((right << 32) | left, _FP_T, 64).to_bytes(8, "big")


# -- VNC Authentication (rfbproto 7.2.2) --------------------------------------------------------

_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def vnc_auth_key(password: bytes) -> bytes:
    """The DES key VNC Authentication derives from a password: first 8 bytes, zero padded,
    each byte bit-reversed (what every VNC viewer does, so the same password works)."""
    return password[:8].ljust(8, b"\0").translate(_REVERSED)


def vnc_auth_response(password: bytes, challenge: bytes) -> bytes:
    """The 16-byte response a viewer sends for ``challenge`` (also used to check it)."""
    if len(challenge) != 16:
        raise ValueError("VNC Authentication challenge must be 16 bytes")
    key = vnc_auth_key(password)
    return des_encrypt_block(key, challenge[:8]) + des_encrypt_block(key, challenge[8:])


def vnc_auth_check(password: bytes, challenge: bytes, response: bytes) -> bool:
    """Constant-time comparison of a viewer's response with the expected one."""
    return hmac.compare_digest(vnc_auth_response(password, challenge), bytes(response))


# -- TLSNone (anonymous DH) ---------------------------------------------------------------------

#: RFC 7919 ffdhe2048 as PKCS#3 DHparams (``openssl genpkey -genparam -algorithm DH
#: -pkeyopt group:ffdhe2048``); the unit test recomputes p from the RFC's formula.
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

#: Anonymous suites only.  SECLEVEL=0 because OpenSSL 3 refuses unauthenticated suites at any
#: higher level; the lack of authentication is the point of TLSNone (use X509* to authenticate).
ANON_CIPHERS = "aNULL:!eNULL:@SECLEVEL=0"


def make_anon_tls_context() -> ssl.SSLContext:
    """Server context for VeNCrypt TLSNone/TLSVnc: anonymous (EC)DH, TLS 1.2 only.

    TLS 1.3 has no anonymous key exchange, hence the 1.2 ceiling.  ``load_dh_params`` only takes
    a file name, so the bundled PEM goes through a private temporary file.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ANON_CIPHERS)
    quiet_tls_context(ctx)
    fd, path = tempfile.mkstemp(prefix="dmore-ffdhe2048-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(FFDHE2048_PEM)
        ctx.load_dh_params(path)
    finally:
        os.unlink(path)
    return ctx


def make_x509_tls_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """Server context for VeNCrypt X509None/X509Vnc: certificate-authenticated TLS 1.2+."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    quiet_tls_context(ctx)
    return ctx


def quiet_tls_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Disable TLS 1.3 session tickets on a server context (idempotent; returns ``ctx``).

    OpenSSL sends two NewSessionTicket messages right after a TLS 1.3 handshake, in the same
    flight as the first RFB bytes (SecurityResult or the VNC challenge).  TigerVNC 1.12's viewer
    then hangs in "processing security result message": GnuTLS has already pulled those bytes
    off the socket, so the viewer waits for a readability that never comes (measured here with
    X509None; TLS 1.2, or no tickets, connects).  VNC clients never resume sessions, so the
    tickets buy nothing.
    """
    ctx.num_tickets = 0
    return ctx
