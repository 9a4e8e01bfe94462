"""The toolstack's device plumbing: what libxl writes for ``vkb=[...]`` and ``vfb=[...]``.

``libxl__device_generic_add`` (tools/libs/light/libxl_device.c) creates, in one transaction:

* the **frontend** dir ``/local/domain/<fe>/device/<kind>/<devid>`` with ``backend``,
  ``backend-id`` and ``state=1`` (Initialising), owned by the frontend domain and readable by
  the backend domain (``n<fe> r<be>``);
* the **backend** dir ``/local/domain/<be>/backend/<kind>/<fe>/<devid>`` with ``frontend``,
  ``frontend-id``, ``online=1``, ``state=1`` and the device's own keys, owned by the backend
  domain and readable by the frontend (``n<be> r<fe>``);
* the toolstack's private copy ``/libxl/<fe>/device/<kind>/<devid>`` (``frontend``,
  ``backend`` and the backend keys), dom0-only: what libxl reads back, never trusting the
  guest's or the backend's dirs.

The backend may be dom0 or a driver domain -- here the RM VM.  Device keys: vkb writes only
what was configured (``unique-id``, ``feature-*``, ``width``/``height``; QEMU writes its own
features); vfb writes ``vnc``, ``vnclisten``, ``vncpasswd``, ``vncdisplay``, ``vncunused``,
``sdl``, ``opengl`` (``libxl__set_xenstore_vfb``).

Removal is libxl's: a Connected backend gets ``online=0`` and ``state=5`` (Closing) and is given
:data:`LIBXL_DESTROY_TIMEOUT` seconds to reach Closed; then (or right away, or after the
timeout, as libxl's forced retry does) the three dirs are deleted.

Atomicity: libxl also creates the dirs and sets their permissions inside the transaction.
``api.Transaction`` has no ``mkdir``/``set_perms``; when the transaction object offers them they
are used exactly like libxl.  Otherwise the parents of the two dirs are given the device
permissions for the moment of the transaction, so that every node is created with its final
permissions and appears at once, complete, to both ends; the parents' permissions are restored
right after (the only difference from libxl: during those few milliseconds the frontend domain
could create siblings under ``device/<kind>``).
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dmore_nova.xen import api
from dmore_nova.xen.api import XenError
from dmore_nova.xen.io.xenbus import XenbusState

KINDS = ("vkbd", "vfb")
#: libxl's LIBXL_DESTROY_TIMEOUT (seconds a backend gets to close on removal).
LIBXL_DESTROY_TIMEOUT = 10.0
#: Domain ids are below DOMID_FIRST_RESERVED (xen.h).
DOMID_FIRST_RESERVED = 0x7FF0
#: Longest device key value accepted (xenstore's payload limit is 4096 incl. the path).
MAX_VALUE_LEN = 1024
#: Polling interval bounds while waiting for a backend to close (one-shot toolstack wait).
_POLL_MIN, _POLL_MAX = 0.005, 0.1

_BACKEND_RE = re.compile(
    r"^/local/domain/(\d{1,5})/backend/([a-z0-9_-]{1,16})/(\d{1,5})/(\d{1,9})$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class DevicePaths:
    """Where one PV device lives in xenstore."""

    kind: str
    fe_domid: int
    be_domid: int
    devid: int

    @property
    def frontend(self) -> str:
        return f"/local/domain/{self.fe_domid}/device/{self.kind}/{self.devid}"

    @property
    def backend(self) -> str:
        return (f"/local/domain/{self.be_domid}/backend/{self.kind}/{self.fe_domid}/"
                f"{self.devid}")

    @property
    def libxl(self) -> str:
        return f"/libxl/{self.fe_domid}/device/{self.kind}/{self.devid}"

    @property
    def frontend_perms(self) -> list[str]:
        return [f"n{self.fe_domid}", f"r{self.be_domid}"]

    @property
    def backend_perms(self) -> list[str]:
        return [f"n{self.be_domid}", f"r{self.fe_domid}"]


def _check_ids(kind: str, fe_domid: int, be_domid: int, devid: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"device kind {kind!r} not in {KINDS}")
    if not 0 < fe_domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"frontend domid {fe_domid} is not a guest domain")
    if not 0 <= be_domid < DOMID_FIRST_RESERVED or be_domid == fe_domid:
        raise ValueError(f"backend domid {be_domid} invalid for frontend {fe_domid}")
    if not 0 <= devid < 1 << 20:
        raise ValueError(f"devid {devid} out of range")


def _check_keys(keys: Mapping[str, str]) -> None:
    for k, v in keys.items():
        if not _KEY_RE.match(k):
            raise ValueError(f"bad device key {k!r}")
        if len(v) > MAX_VALUE_LEN:
            raise ValueError(f"value of {k} longer than {MAX_VALUE_LEN}")


def add_device(xs: api.XenStore, kind: str, fe_domid: int, be_domid: int, devid: int = 0, *,
               backend_keys: Mapping[str, str] | None = None) -> DevicePaths:
    """Create device ``kind`` ``devid`` of ``fe_domid`` served by ``be_domid`` (see the module
    docstring).  ``xs`` must have dom0's rights.  An existing device with these ids is
    replaced, as libxl's ``xs_rm`` before writing does."""
    _check_ids(kind, fe_domid, be_domid, devid)
    extra = {k: str(v) for k, v in (backend_keys or {}).items()}
    _check_keys(extra)
    dev = DevicePaths(kind, fe_domid, be_domid, devid)
    state = XenbusState.Initialising.to_xenstore()
    fents = {"backend": dev.backend, "backend-id": str(be_domid), "state": state}
    bents = {"frontend-id": str(fe_domid), "online": "1", "state": state, **extra}

    def body(t: api.Transaction) -> None:
        for path in (dev.libxl, dev.frontend, dev.backend):
            t.rm(path)
        t.write(f"{dev.libxl}/frontend", dev.frontend)
        t.write(f"{dev.libxl}/backend", dev.backend)
        # Each dir is created with its final permissions inside the transaction: no node is
        # ever visible to the guest with its parent's permissions.
        t.mkdir(dev.frontend)
        t.set_perms(dev.frontend, dev.frontend_perms)
        for k, v in fents.items():
            t.write(f"{dev.frontend}/{k}", v)
        t.mkdir(dev.backend)
        t.set_perms(dev.backend, dev.backend_perms)
        t.write(f"{dev.backend}/frontend", dev.frontend)
        for k, v in bents.items():
            t.write(f"{dev.backend}/{k}", v)
        # The toolstack's own copy of the backend keys (libxl: "we don't need to trust the
        # backend").
        for k, v in bents.items():
            t.write(f"{dev.libxl}/{k}", v)

    xs.run_transaction(body)
    return dev


def add_vkbd(xs: api.XenStore, fe_domid: int, be_domid: int = 0, devid: int = 0, *,
             unique_id: str | None = None, feature_disable_keyboard: bool = False,
             feature_disable_pointer: bool = False, feature_abs_pointer: bool = False,
             feature_raw_pointer: bool = False, feature_multi_touch: bool = False,
             multi_touch_width: int = 0, multi_touch_height: int = 0,
             multi_touch_num_contacts: int = 0, width: int = 0,
             height: int = 0) -> DevicePaths:
    """``libxl_device_vkb_add``: only configured keys are written (``libxl__set_xenstore_vkb``;
    a QEMU-type backend writes its own features)."""
    keys: dict[str, str] = {}
    if unique_id:
        keys["unique-id"] = unique_id
    for key, on in (("feature-disable-keyboard", feature_disable_keyboard),
                    ("feature-disable-pointer", feature_disable_pointer),
                    ("feature-abs-pointer", feature_abs_pointer),
                    ("feature-raw-pointer", feature_raw_pointer)):
        if on:
            keys[key] = "1"
    if feature_multi_touch:
        keys.update({"feature-multi-touch": "1",
                     "multi-touch-width": str(multi_touch_width),
                     "multi-touch-height": str(multi_touch_height),
                     "multi-touch-num-contacts": str(multi_touch_num_contacts)})
    if width:
        keys["width"] = str(width)
    if height:
        keys["height"] = str(height)
    return add_device(xs, "vkbd", fe_domid, be_domid, devid, backend_keys=keys)


def add_vfb(xs: api.XenStore, fe_domid: int, be_domid: int = 0, devid: int = 0, *,
            vnc: bool = True, vnclisten: str = "127.0.0.1", vncpasswd: str | None = None,
            vncdisplay: int = 0, vncunused: bool = True, sdl: bool = False,
            opengl: bool = False) -> DevicePaths:
    """``libxl_device_vfb_add`` with ``libxl__set_xenstore_vfb``'s keys."""
    keys = {"vnc": "1" if vnc else "0", "vnclisten": vnclisten,
            "vncdisplay": str(vncdisplay), "vncunused": "1" if vncunused else "0",
            "sdl": "1" if sdl else "0", "opengl": "1" if opengl else "0"}
    if vncpasswd is not None:
        keys["vncpasswd"] = vncpasswd
    return add_device(xs, "vfb", fe_domid, be_domid, devid, backend_keys=keys)


def find_device(xs: api.XenStore, kind: str, fe_domid: int, devid: int = 0
                ) -> DevicePaths | None:
    """The device's paths from the toolstack's own record (``/libxl/...``), or None.

    The backend path is taken from the dom0-only libxl dir, never from the guest-writable
    frontend dir, and checked against the shape :func:`add_device` writes."""
    if kind not in KINDS:
        raise ValueError(f"device kind {kind!r} not in {KINDS}")
    raw = xs.read(f"/libxl/{fe_domid}/device/{kind}/{devid}/backend")
    if raw is None:
        return None
    m = _BACKEND_RE.match(raw.decode("ascii", "replace"))
    if m is None or m.group(2) != kind or int(m.group(3)) != fe_domid or int(
            m.group(4)) != devid:
        raise XenError(errno.EINVAL, f"/libxl record of {kind}/{devid} names {raw[:120]!r}")
    return DevicePaths(kind, fe_domid, int(m.group(1)), devid)


def list_devices(xs: api.XenStore, fe_domid: int) -> list[DevicePaths]:
    """Every vkbd/vfb device the toolstack created for ``fe_domid``."""
    out = []
    for kind in KINDS:
        for d in xs.directory(f"/libxl/{fe_domid}/device/{kind}"):
            if d.isdigit():
                dev = find_device(xs, kind, fe_domid, int(d))
                if dev is not None:
                    out.append(dev)
    return out


def _backend_state(xs: api.XenStore, dev: DevicePaths) -> XenbusState | None:
    raw = xs.read(f"{dev.backend}/state")
    if raw is None:
        return None
    try:
        return XenbusState.parse(raw)
    except ValueError:
        return XenbusState.Unknown


def remove_device(xs: api.XenStore, kind: str, fe_domid: int, devid: int = 0, *,
                  timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """``libxl_device_<kind>_remove``: ask a Connected backend to close, wait up to ``timeout``
    seconds for Closed, then delete the device.  True if the backend closed (or was not
    connected), False if it had to be forced; XenError(ENOENT) if there is no such device.

    The wait polls the backend's state (a one-shot toolstack operation, bounded by
    ``timeout``) rather than registering a watch on ``xs``, whose event queue may belong to
    another user of the connection.
    """
    dev = find_device(xs, kind, fe_domid, devid)
    if dev is None:
        raise XenError(errno.ENOENT, f"dom{fe_domid} has no {kind} {devid}")
    clean = True
    if _backend_state(xs, dev) is XenbusState.Connected:
        def close(t: Any) -> None:
            t.write(f"{dev.backend}/online", "0")
            t.write(f"{dev.backend}/state", XenbusState.Closing.to_xenstore())

        xs.run_transaction(close)
        deadline = time.monotonic() + timeout
        delay = _POLL_MIN
        while True:
            state = _backend_state(xs, dev)
            if state in (XenbusState.Closed, None):
                break
            if time.monotonic() >= deadline:
                clean = False
                break
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
    destroy_device(xs, kind, fe_domid, devid)
    return clean


def destroy_device(xs: api.XenStore, kind: str, fe_domid: int, devid: int = 0) -> None:
    """``libxl__device_destroy``: delete the frontend, backend and libxl dirs (and their
    parents that became empty, up to ``device/<kind>`` and ``backend/<kind>``).  Missing
    pieces are not an error."""
    dev = find_device(xs, kind, fe_domid, devid)
    if dev is None:
        return

    def body(t: Any) -> None:
        for path, stop_at in ((dev.frontend, f"/local/domain/{fe_domid}/device"),
                              (dev.backend, f"/local/domain/{dev.be_domid}/backend"),
                              (dev.libxl, f"/libxl/{fe_domid}")):
            t.rm(path)
            parent = path.rsplit("/", 1)[0]
            while parent != stop_at and parent.startswith(stop_at + "/") and not t.directory(
                    parent):
                t.rm(parent)
                parent = parent.rsplit("/", 1)[0]

    xs.run_transaction(body)
