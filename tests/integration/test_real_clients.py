"""Our RFB server (demo display) against real, independently written VNC clients.

Clients: vncdotool 1.4 (Twisted), noVNC 1.7 in headless Chromium through websockify 0.13 (real
browser key and mouse events), TigerVNC 1.12 ``vncviewer`` under Xvfb and ``vncsnapshot``.  The
same harness is refereed by QEMU's VNC server in ``test_clients_vs_qemu.py``.

What a test compares against is always the server's own framebuffer (``framebuffer_rgb()``,
copied on the server's loop) and the input the demo display received (``keys()``,
``pointers()``, ``text()``), never a hard-coded picture.  Encodings are forced one per run where
the client allows it, and the rect counts the client decoded prove which encoding was used:

=============  ==============================================================
Raw            vncdotool, noVNC, vncsnapshot
CopyRect       noVNC (a display copy while the viewer is in sync)
Hextile        vncdotool, noVNC, vncsnapshot
ZRLE           vncdotool, noVNC
Tight zlib     noVNC (no quality level sent), vncsnapshot, vncviewer -NoJPEG
Tight JPEG     noVNC (quality level 9 on a photo-like area; compared with a tolerance)
=============  ==============================================================
"""

from __future__ import annotations

import numpy as np
import pytest

from dmore_nova.rm_vm.rfb.display import KeyInput, PointerInput, Rect
from tests.integration.clients import assert_same_image, wait_until
from tests.integration.clients.fixtures import *  # noqa: F403 (pytest fixtures)
from tests.integration.clients.tigervnc import vncsnapshot
from tests.integration.clients.tls import make_test_pki
from tests.integration.clients.vncdotool_client import AuthenticationError

pytestmark = pytest.mark.filterwarnings(
    "ignore::cryptography.utils.CryptographyDeprecationWarning")

PASSWORD = "pa55word"
W, H = 800, 600  # the demo's default size


def key_triples(keys: list[KeyInput]) -> list[tuple[bool, int, int | None]]:
    return [(k.down, k.keysym, k.scancode) for k in keys]


def paint_photo(server, x: int = 300, y: int = 200, w: int = 400, h: int = 300) -> None:
    """Put a smooth, many-coloured picture (what Tight sends as JPEG) into the demo's
    framebuffer, on the server's loop, and report the damage as a display would."""
    def paint() -> None:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        r = (127 + 127 * np.sin(xx / 23.0) * np.cos(yy / 31.0)).astype(np.uint32)
        g = (yy * 255 / h).astype(np.uint32)
        b = (127 + 127 * np.sin((xx + yy) / 17.0)).astype(np.uint32)
        server.display.framebuffer()[y:y + h, x:x + w] = (r << 16) | (g << 8) | b
        server.display.notify_damage(Rect(x, y, w, h))
    server.on_loop(paint)


def copy_area(server, src_x: int, src_y: int, dst: Rect) -> None:
    """Move pixels inside the demo's framebuffer and report it as a copy (CopyRect source)."""
    def copy() -> None:
        fb = server.display.framebuffer()
        fb[dst.y:dst.y + dst.h, dst.x:dst.x + dst.w] = \
            fb[src_y:src_y + dst.h, src_x:src_x + dst.w].copy()
        server.display.notify_copied(src_x, src_y, dst)
    server.on_loop(copy)


# == vncdotool ====================================================================================
@pytest.mark.parametrize("pixel_format", [None, "rgbx32", "bgrx32"])
@pytest.mark.parametrize("encodings", [["raw"], ["hextile"], ["zrle"]], ids=lambda e: e[0])
def test_vncdotool_screenshot_is_the_framebuffer(demo_server, vncdotool_connect, encodings,
                                                 pixel_format):
    client = vncdotool_connect(demo_server.host, demo_server.port, encodings=encodings,
                               pixel_format=pixel_format)
    info = client.info()
    assert (info["width"], info["height"]) == (W, H)
    assert_same_image(client.capture(), demo_server.framebuffer_rgb())
    assert set(client.info()["rects"]) == {encodings[0]}


def test_vncdotool_types_text(demo_server, vncdotool_connect):
    client = vncdotool_connect(demo_server.host, demo_server.port, encodings=["zrle"])
    text = "Hello, World 42!"
    client.type(text)
    client.key("enter")
    demo_server.wait_for(lambda: demo_server.text() == text + "\n", what="the echoed text")
    expected = []
    for ch in text:
        expected += [(True, ord(ch), None), (False, ord(ch), None)]
    expected += [(True, 0xFF0D, None), (False, 0xFF0D, None)]  # XK_Return
    assert key_triples(demo_server.keys()) == expected
    client.wait_for_screen(demo_server.framebuffer_rgb())  # the echo is visible


def test_vncdotool_pointer(demo_server, vncdotool_connect):
    client = vncdotool_connect(demo_server.host, demo_server.port)
    client.move(123, 45)
    client.mouse_down(1)
    client.mouse_up(1)
    client.move(700, 500)
    for button in (3, 4, 5):  # right, wheel up, wheel down
        client.mouse_down(button)
        client.mouse_up(button)
    want = [PointerInput(123, 45, 0), PointerInput(123, 45, 1), PointerInput(123, 45, 0),
            PointerInput(700, 500, 0), PointerInput(700, 500, 4), PointerInput(700, 500, 0),
            PointerInput(700, 500, 8), PointerInput(700, 500, 0),
            PointerInput(700, 500, 16), PointerInput(700, 500, 0)]
    demo_server.wait_for(lambda: len(demo_server.pointers()) >= len(want), what="pointers")
    assert demo_server.pointers() == want
    client.wait_for_screen(demo_server.framebuffer_rgb())  # the demo's pointer line


def test_vncdotool_vnc_password(demo_server_factory, vncdotool_connect):
    server = demo_server_factory(password=PASSWORD)
    client = vncdotool_connect(server.host, server.port, password=PASSWORD)
    assert_same_image(client.capture(), server.framebuffer_rgb())
    client.type("ok")
    server.wait_for(lambda: server.text() == "ok", what="typed text")


def test_vncdotool_wrong_or_missing_password_refused(demo_server_factory, vncdotool_connect):
    server = demo_server_factory(password=PASSWORD)
    with pytest.raises(AuthenticationError):
        vncdotool_connect(server.host, server.port, password="not-it")
    with pytest.raises(AuthenticationError, match="password required"):
        vncdotool_connect(server.host, server.port)
    assert server.keys() == []


def test_vncdotool_view_only_server_ignores_input(demo_server_factory, vncdotool_connect):
    server = demo_server_factory(view_only=True)
    client = vncdotool_connect(server.host, server.port)
    client.type("x")
    client.click(10, 10)
    # A full update after the input is a round trip: had the input been taken, it would have
    # been handled (the loop is ordered) before this capture's reply.
    assert_same_image(client.capture(), server.framebuffer_rgb())
    assert server.keys() == [] and server.pointers() == [] and server.text() == ""


# == noVNC in headless Chromium via websockify ====================================================
@pytest.mark.browser
@pytest.mark.parametrize("encodings,kind", [
    (["raw"], "raw"), (["hextile"], "hextile"), (["zrle"], "zrle"), (["tight"], "tight"),
], ids=["raw", "hextile", "zrle", "tight-zlib"])
def test_novnc_canvas_is_the_framebuffer(demo_server, novnc_connect, encodings, kind):
    viewer = novnc_connect(demo_server.host, demo_server.port, encodings=encodings)
    assert viewer.state()["state"] == "connected"
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    rects = viewer.state()["rects"]
    pixel_rects = {k for k in rects if not k.startswith("pseudo-")}
    assert pixel_rects - {"tight-fill", "tight-basic"} == {kind}, rects
    # No quality level was sent: Tight must stay lossless.
    assert "tight-jpeg" not in rects


def _resize(server, w: int, h: int) -> None:
    assert server.on_loop(lambda: server.display.request_resize(w, h)) == 0


@pytest.mark.browser
@pytest.mark.parametrize("pseudo", [["extended-desktop-size"], ["desktop-size"]],
                         ids=["ExtendedDesktopSize", "DesktopSize"])
def test_novnc_follows_a_server_resize(demo_server, novnc_connect, pseudo):
    viewer = novnc_connect(demo_server.host, demo_server.port, encodings=["raw"],
                           pseudo=pseudo)
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    _resize(demo_server, 640, 400)
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    assert viewer.pixels().shape[:2] == (400, 640)


def test_vncdotool_follows_a_server_resize(demo_server, vncdotool_connect):
    c = vncdotool_connect(demo_server.host, demo_server.port, encodings=["raw"],
                          pseudo=("desktop-size",))
    c.wait_for_screen(demo_server.framebuffer_rgb())
    _resize(demo_server, 512, 384)
    c.wait_for_screen(demo_server.framebuffer_rgb())
    assert c.capture().shape[:2] == (384, 512)


@pytest.mark.browser
def test_novnc_tight_jpeg(demo_server, novnc_connect):
    paint_photo(demo_server)
    viewer = novnc_connect(demo_server.host, demo_server.port, encodings=["tight"],
                           quality_level=9)
    want = demo_server.framebuffer_rgb()
    got = viewer.wait_for_screen(want, tolerance=32, mean_tolerance=0.5)
    assert viewer.state()["rects"].get("tight-jpeg", 0) >= 1
    # Lossy only where the photo is: the text/UI parts stay exact.
    assert_same_image(got[:200], want[:200])


@pytest.mark.browser
def test_novnc_copyrect(demo_server, novnc_connect):
    viewer = novnc_connect(demo_server.host, demo_server.port, encodings=["copyrect", "raw"])
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    copy_area(demo_server, 0, 0, Rect(100, 300, 400, 32))
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    rects = viewer.state()["rects"]
    assert rects.get("copyrect", 0) >= 1, rects


@pytest.mark.browser
def test_novnc_keys_carry_keysyms_and_xt_scancodes(demo_server, novnc_connect):
    viewer = novnc_connect(demo_server.host, demo_server.port)
    assert viewer.state()["qemuExtKey"] is True  # the server acked QEMU extended key events
    for key in ("a", "Enter", "ArrowLeft", "Shift+B"):
        viewer.press(key)
    want = [
        (True, 0x61, 0x1E), (False, 0x61, 0x1E),          # a
        (True, 0xFF0D, 0x1C), (False, 0xFF0D, 0x1C),      # Return
        (True, 0xFF51, 0xCB), (False, 0xFF51, 0xCB),      # Left: E0 4B -> 0x80|0x4B
        (True, 0xFFE1, 0x2A), (True, 0x42, 0x30), (False, 0x42, 0x30), (False, 0xFFE1, 0x2A),
    ]
    demo_server.wait_for(lambda: len(demo_server.keys()) >= len(want), what="key events")
    assert key_triples(demo_server.keys()) == want
    assert demo_server.text() == "a\nB"
    viewer.wait_for_screen(demo_server.framebuffer_rgb())


@pytest.mark.browser
def test_novnc_typed_text_is_echoed(demo_server, novnc_connect):
    viewer = novnc_connect(demo_server.host, demo_server.port, encodings=["zrle"])
    viewer.type("Hi, noVNC!")
    demo_server.wait_for(lambda: demo_server.text() == "Hi, noVNC!", what="echoed text")
    viewer.wait_for_screen(demo_server.framebuffer_rgb())


@pytest.mark.browser
def test_novnc_decodes_cursor_and_led_state(demo_server, novnc_connect):
    """The Cursor and QEMU LED State pseudo-rectangles reach noVNC's own handlers and are
    accepted (its handlers return false on short or malformed data)."""
    viewer = novnc_connect(demo_server.host, demo_server.port)
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    rects = viewer.state()["rects"]
    assert rects.get("pseudo-cursor", 0) >= 1
    assert rects.get("pseudo-qemu-led", 0) >= 1


def test_vncdotool_decodes_cursor(demo_server, vncdotool_connect):
    """vncdotool pastes the cursor it decoded into its screenshots at its pointer position
    (0, 0 here, hot spot 0, 0): the capture must be the framebuffer with our arrow on top."""
    from dmore_nova.rm_vm.rfb.demo import ARROW
    from tests.integration.rfb_harness import rgb

    c = vncdotool_connect(demo_server.host, demo_server.port, encodings=["raw"],
                          pseudo=("desktop-size", "cursor"))
    want = demo_server.framebuffer_rgb()
    h, w = ARROW.mask.shape
    want[:h, :w][ARROW.mask] = rgb(ARROW.pixels)[ARROW.mask]
    c.wait_for_screen(want)
    assert c.info()["rects"].get("-239", 0) >= 1


@pytest.mark.browser
def test_novnc_pointer(demo_server, novnc_connect):
    viewer = novnc_connect(demo_server.host, demo_server.port)
    viewer.click(100, 200)
    viewer.click(640, 480, button=3)
    # noVNC sends the motion, then the press and the release, at the framebuffer pixel the
    # browser's mouse is on.
    want = [PointerInput(100, 200, 0), PointerInput(100, 200, 1), PointerInput(100, 200, 0),
            PointerInput(640, 480, 0), PointerInput(640, 480, 4), PointerInput(640, 480, 0)]
    demo_server.wait_for(lambda: len(demo_server.pointers()) >= len(want), what="clicks")
    assert demo_server.pointers() == want
    viewer.wheel(120, x=300, y=300)    # down
    viewer.wheel(-120, x=300, y=300)   # up
    demo_server.wait_for(lambda: {p.buttons for p in demo_server.pointers()[6:]} >= {8, 16},
                         what="wheel events")
    wheel = [p for p in demo_server.pointers()[6:] if p.buttons]
    assert [p.buttons for p in wheel] == [16, 8]
    assert all((p.x, p.y) == (300, 300) for p in wheel)
    viewer.wait_for_screen(demo_server.framebuffer_rgb)  # the pointer line may still change


@pytest.mark.browser
def test_novnc_vnc_password(demo_server_factory, novnc_connect):
    server = demo_server_factory(password=PASSWORD)
    viewer = novnc_connect(server.host, server.port, password=PASSWORD)
    viewer.wait_for_screen(server.framebuffer_rgb())
    wrong = novnc_connect(server.host, server.port, password="nope")
    st = wrong.state()
    assert st["state"] == "failed" and st["securityStatus"] == 1, st
    missing = novnc_connect(server.host, server.port)
    assert missing.state()["state"] == "failed"


@pytest.mark.browser
def test_novnc_vencrypt_plain(demo_server_factory, novnc_connect):
    server = demo_server_factory(security_types=["vencrypt-plain"],
                                 plain_users={"alice": "wonderland"})
    viewer = novnc_connect(server.host, server.port, username="alice", password="wonderland")
    assert viewer.state()["authScheme"] == 256  # noVNC records the VeNCrypt subtype: Plain
    viewer.wait_for_screen(server.framebuffer_rgb())
    viewer.press("z")
    server.wait_for(lambda: server.text() == "z", what="typed text")
    for user, pw in (("alice", "rabbit"), ("mallory", "wonderland")):
        st = novnc_connect(server.host, server.port, username=user, password=pw).state()
        assert st["state"] == "failed", (user, st)


# == TigerVNC =====================================================================================
def viewer_encodings(server) -> list[int]:
    """The encoding our server chose for each connected viewer (read on the server's loop).
    TigerVNC cannot be limited to one encoding, so this is how its run proves which one it
    decoded.  (Reaches into RFBServer.viewers[].encoder: the harness has no probe for it.)"""
    return server.on_loop(lambda: [v.encoder.encoding for v in server.server.viewers
                                   if v.encoder is not None])


# TigerVNC 1.12 sends its pseudo-encodings first, then -PreferredEncoding, then CopyRect and the
# rest (measured: [..., -258, 7, 1, 16, 5, 2, 1, 0, -254, -24] for Tight); a server picking the
# first encoding it supports therefore picks the preferred one.
@pytest.mark.parametrize("encoding,number", [("Tight", 7), ("ZRLE", 16), ("Hextile", 5),
                                             ("Raw", 0)])
def test_tigervnc_viewer_shows_the_framebuffer(demo_server, tigervnc_viewer, encoding, number):
    viewer = tigervnc_viewer(demo_server.host, demo_server.port, preferred_encoding=encoding,
                             no_jpeg=True)
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    assert viewer_encodings(demo_server) == [number]


def test_tigervnc_keys(demo_server, tigervnc_viewer):
    viewer = tigervnc_viewer(demo_server.host, demo_server.port)
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    viewer.key("a", "Return", "Left")
    demo_server.wait_for(lambda: len(demo_server.keys()) >= 6, what="key events")
    # TigerVNC sends QEMU extended key events too (scancodes from the X keycodes).
    assert key_triples(demo_server.keys()) == [
        (True, 0x61, 0x1E), (False, 0x61, 0x1E), (True, 0xFF0D, 0x1C), (False, 0xFF0D, 0x1C),
        (True, 0xFF51, 0xCB), (False, 0xFF51, 0xCB)]
    viewer.wait_for_screen(demo_server.framebuffer_rgb())
    # TigerVNC saw our EndOfContinuousUpdates advertisement and switched to continuous
    # updates (and fences), so the echo above reached it without per-update requests.
    conn = demo_server.on_loop(lambda: demo_server.server.viewers[0].conn)
    assert conn.continuous_updates is not None
    assert conn.supports_fence and conn.supports_continuous_updates


@pytest.mark.parametrize("security", ["TLSNone", "X509None", "X509Vnc", "Plain", "VncAuth"])
def test_tigervnc_security_types(demo_server_factory, tigervnc_viewer, vnc_pki, security):
    ours = {"TLSNone": "vencrypt-tlsnone", "X509None": "vencrypt-x509none",
            "X509Vnc": "vencrypt-x509vnc", "Plain": "vencrypt-plain", "VncAuth": "vnc"}[security]
    kw: dict = {"security_types": [ours]}
    if security.startswith("X509"):
        kw.update(tls_cert_file=str(vnc_pki.server_cert), tls_key_file=str(vnc_pki.server_key))
    if security in ("X509Vnc", "VncAuth"):
        kw["password"] = PASSWORD
    if security == "Plain":
        kw["plain_users"] = {"bob": PASSWORD}
    server = demo_server_factory(**kw)
    viewer = tigervnc_viewer(server.host, server.port, security_types=[security],
                             password=PASSWORD if security != "X509None" and
                             security != "TLSNone" else None,
                             username="bob" if security == "Plain" else None,
                             x509_ca=vnc_pki.ca_cert)
    viewer.wait_for_screen(server.framebuffer_rgb())


def test_tigervnc_x509vnc_wrong_password(demo_server_factory, tigervnc_viewer, vnc_pki):
    server = demo_server_factory(security_types=["vencrypt-x509vnc"], password=PASSWORD,
                                 tls_cert_file=str(vnc_pki.server_cert),
                                 tls_key_file=str(vnc_pki.server_key))
    viewer = tigervnc_viewer(server.host, server.port, security_types=["X509Vnc"],
                             password="wrong", x509_ca=vnc_pki.ca_cert)
    viewer.wait_exit()
    assert "Authentication failure" in viewer.log()


def test_tigervnc_rejects_certificate_from_another_ca(demo_server_factory, tigervnc_viewer,
                                                      vnc_pki, tmp_path):
    """The X509 handshake really verifies: a viewer trusting only a different CA stops and
    asks the user about the unknown issuer instead of showing the desktop."""
    other = make_test_pki(tmp_path / "other")
    server = demo_server_factory(security_types=["vencrypt-x509none"],
                                 tls_cert_file=str(vnc_pki.server_cert),
                                 tls_key_file=str(vnc_pki.server_key))
    viewer = tigervnc_viewer(server.host, server.port, security_types=["X509None"],
                             x509_ca=other.ca_cert)
    wait_until(lambda: "Unknown certificate issuer" in viewer.window_titles(), 10.0,
               what="TigerVNC's unknown-issuer question")
    assert "Using pixel format" not in viewer.log()  # never got past the security handshake


@pytest.mark.parametrize("encodings", [["raw"], ["hextile"], ["tight"], ["copyrect", "raw"]],
                         ids=lambda e: "+".join(e))
def test_vncsnapshot(demo_server_factory, encodings):
    server = demo_server_factory(password=PASSWORD)
    got = vncsnapshot(server.host, server.port, password=PASSWORD, encodings=encodings)
    # vncsnapshot only writes JPEG (quality 100): near-exact, not exact.
    assert_same_image(got, server.framebuffer_rgb(), tolerance=8, mean_tolerance=0.5)


def test_vncdotool_view_only_password_among_full_viewers(demo_server_factory, vncdotool_connect):
    """Two passwords: a viewer with the view-only one sees the screen but its input is ignored,
    while a viewer with the full password types on the same display."""
    server = demo_server_factory(password="full-pw", view_only_password="look")
    looker = vncdotool_connect(server.host, server.port, password="look")
    typer = vncdotool_connect(server.host, server.port, password="full-pw")
    looker.type("no")
    looker.click(10, 10)
    typer.type("yes")
    server.wait_for(lambda: server.text() == "yes", what="the full viewer's keys")
    assert [p for p in server.pointers()] == []
    looker.wait_for_screen(server.framebuffer_rgb())
    assert server.text() == "yes"
