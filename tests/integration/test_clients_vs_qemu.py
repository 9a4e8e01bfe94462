"""The real-client harness, refereed by QEMU's own VNC server.

Before a real client is allowed to judge *our* RFB server, each harness (vncdotool, noVNC in
Chromium, TigerVNC's vncviewer, vncsnapshot) must reproduce QEMU's own ``screendump`` of a
QEMU guest through QEMU's VNC server, and the input it sends must arrive in QEMU as the right
keysyms and scancodes (QEMU's trace log).  The guest paints a known test card
(``clients/qemu_testcard.S``), which is itself checked against an independent numpy model.

Marked ``qemu`` (deselect with ``-m "not qemu"``); it runs by default.
"""

from __future__ import annotations

import pytest

from tests.integration.clients import assert_same_image, wait_until
from tests.integration.clients.fixtures import *  # noqa: F403 (pytest fixtures)
from tests.integration.clients.qemu_vnc import QemuVnc, expected_testcard
from tests.integration.clients.tigervnc import vncsnapshot
from tests.integration.clients.vncdotool_client import AuthenticationError

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning"),
]

PASSWORD = "s3cr3t"


@pytest.fixture(scope="module")
def qemu() -> QemuVnc:
    with QemuVnc() as q:
        q.wait_testcard()
        yield q


@pytest.fixture(scope="module")
def qemu_pw() -> QemuVnc:
    with QemuVnc(password=PASSWORD) as q:
        q.wait_testcard()
        yield q


def new_keys(q: QemuVnc, before: int, count: int) -> list[tuple[bool, int, int, bool]]:
    """Wait for ``count`` key events after the first ``before`` in QEMU's trace."""
    keys = wait_until(lambda: (k := q.keys()) and len(k) >= before + count and k, 5.0,
                      what=f"{count} key events in QEMU's trace")
    return [(k.down, k.keysym, k.keycode, k.ext) for k in keys[before:]]


def buttons(q: QemuVnc) -> list[str]:
    return [line.split("input_event_btn ", 1)[1] for line in q.trace_lines()
            if "input_event_btn" in line]


def test_testcard_is_what_qemu_shows(qemu: QemuVnc) -> None:
    """The referee's referee: QEMU's framebuffer is the picture the firmware is meant to paint."""
    assert_same_image(qemu.screendump(), expected_testcard())


# -- vncdotool ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pixel_format", [None, "rgbx32"])
@pytest.mark.parametrize("encodings", [["raw"], ["hextile"], ["zrle"], ["copyrect", "raw"]],
                         ids=lambda e: "+".join(e))
def test_vncdotool_capture_equals_screendump(qemu, vncdotool_connect, encodings, pixel_format):
    client = vncdotool_connect(qemu.host, qemu.port, encodings=encodings,
                               pixel_format=pixel_format)
    assert_same_image(client.capture(), qemu.screendump())
    used = "raw" if encodings[0] == "copyrect" else encodings[0]
    assert set(client.info()["rects"]) == {used}


def test_vncdotool_password(qemu_pw, vncdotool_connect):
    client = vncdotool_connect(qemu_pw.host, qemu_pw.port, password=PASSWORD)
    assert_same_image(client.capture(), qemu_pw.screendump())
    with pytest.raises(AuthenticationError):
        vncdotool_connect(qemu_pw.host, qemu_pw.port, password="wrong")
    with pytest.raises(AuthenticationError, match="password required"):
        vncdotool_connect(qemu_pw.host, qemu_pw.port)


def test_vncdotool_keys_and_buttons_reach_qemu(qemu, vncdotool_connect):
    client = vncdotool_connect(qemu.host, qemu.port)
    before, clicks = len(qemu.keys()), len(buttons(qemu))
    client.type("a")
    client.key("enter")
    client.key("left")
    client.click(10, 20)
    # Plain KeyEvents: QEMU maps the keysyms to scancodes itself (ext=False).
    assert new_keys(qemu, before, 6) == [
        (True, 0x61, 0x1E, False), (False, 0x61, 0x1E, False),
        (True, 0xFF0D, 0x1C, False), (False, 0xFF0D, 0x1C, False),
        (True, 0xFF51, 0xCB, False), (False, 0xFF51, 0xCB, False)]
    wait_until(lambda: len(buttons(qemu)) >= clicks + 2, 5.0, what="button events")
    assert buttons(qemu)[clicks:] == ["con -1, button left, down 1", "con -1, button left, down 0"]


# -- noVNC in Chromium via websockify ----------------------------------------------------------
@pytest.mark.browser
@pytest.mark.parametrize("encodings,rect_kind", [
    (["raw"], "raw"), (["copyrect", "raw"], "raw"), (["hextile"], "hextile"),
    (["zrle"], "zrle"), (["tight"], "tight"),
], ids=["raw", "copyrect+raw", "hextile", "zrle", "tight"])
def test_novnc_canvas_equals_screendump(qemu, novnc_connect, encodings, rect_kind):
    viewer = novnc_connect(qemu.host, qemu.port, encodings=encodings, width=640, height=480)
    viewer.wait_for_screen(qemu.screendump())
    rects = viewer.state()["rects"]
    assert rects.get(rect_kind, 0) >= 1, rects
    pixel_rects = {k for k in rects if not k.startswith("pseudo-")}
    assert pixel_rects - {"tight-fill", "tight-basic"} == {rect_kind}, rects


@pytest.mark.browser
def test_novnc_keys_arrive_as_qemu_extended_key_events(qemu, novnc_connect):
    """Real browser key presses -> noVNC -> QEMU extended key events with XT scancodes."""
    viewer = novnc_connect(qemu.host, qemu.port, width=640, height=480)
    assert viewer.state()["qemuExtKey"] is True
    before, clicks = len(qemu.keys()), len(buttons(qemu))
    for key in ("a", "Enter", "ArrowLeft"):
        viewer.press(key)
    assert new_keys(qemu, before, 6) == [
        (True, 0x61, 0x1E, True), (False, 0x61, 0x1E, True),
        (True, 0xFF0D, 0x1C, True), (False, 0xFF0D, 0x1C, True),
        (True, 0xFF51, 0xCB, True), (False, 0xFF51, 0xCB, True)]
    viewer.click(30, 40)
    wait_until(lambda: len(buttons(qemu)) >= clicks + 2, 5.0, what="button events")
    assert buttons(qemu)[clicks:] == ["con -1, button left, down 1", "con -1, button left, down 0"]


@pytest.mark.browser
def test_novnc_password(qemu_pw, novnc_connect):
    viewer = novnc_connect(qemu_pw.host, qemu_pw.port, password=PASSWORD, width=640, height=480)
    viewer.wait_for_screen(qemu_pw.screendump())
    wrong = novnc_connect(qemu_pw.host, qemu_pw.port, password="wrong", width=640, height=480)
    st = wrong.state()
    assert st["state"] == "failed"
    # QEMU's reason carries a trailing NUL (notes/real-clients.md).
    assert st["reason"].startswith("Authentication failed")


# -- TigerVNC ------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["Tight", "ZRLE", "Hextile", "Raw"])
def test_tigervnc_viewer_equals_screendump(qemu, tigervnc_viewer, encoding):
    viewer = tigervnc_viewer(qemu.host, qemu.port, preferred_encoding=encoding, no_jpeg=True)
    viewer.wait_for_screen(qemu.screendump())


@pytest.mark.parametrize("security,tls", [
    ("VncAuth", None), ("TLSNone", "anon"), ("X509None", "x509"), ("X509Vnc", "x509"),
])
def test_tigervnc_security_types(qemu_vnc_factory, tigervnc_viewer, vnc_pki, security, tls):
    password = PASSWORD if security in ("VncAuth", "X509Vnc") else None
    q = qemu_vnc_factory(password=password, tls=tls, tls_dir=vnc_pki.dir if tls else None)
    viewer = tigervnc_viewer(q.host, q.port, security_types=[security], password=password,
                             password_file=security == "VncAuth", x509_ca=vnc_pki.ca_cert)
    viewer.wait_for_screen(q.screendump())


def test_tigervnc_wrong_password_is_refused(qemu_pw, tigervnc_viewer):
    viewer = tigervnc_viewer(qemu_pw.host, qemu_pw.port, password="wrong")
    viewer.wait_exit()
    assert "Authentication failure" in viewer.log()


@pytest.mark.parametrize("encodings", [["raw"], ["hextile"], ["tight"], ["zlib"],
                                       ["copyrect", "raw"]], ids=lambda e: "+".join(e))
def test_vncsnapshot_equals_screendump(qemu_pw, encodings):
    got = vncsnapshot(qemu_pw.host, qemu_pw.port, password=PASSWORD, encodings=encodings)
    # vncsnapshot only writes JPEG (quality 100): near-exact, not exact.
    assert_same_image(got, qemu_pw.screendump(), tolerance=8, mean_tolerance=0.5)
