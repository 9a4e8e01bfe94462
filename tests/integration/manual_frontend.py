"""A frontend driven step by step from a test, for the backends' hostile-input suite.

The well-behaved Linux-like frontends live in ``dmore_nova.xen.sim.guest``; this one does each
step of the xenbus handshake by hand so that a test can write any value at any point.
"""

from __future__ import annotations

import numpy as np

from dmore_nova.xen.io import fbif as F
from dmore_nova.xen.io import kbdif as K
from dmore_nova.xen.io.xenbus import XenbusState
from dmore_nova.xen.sim.kernel import SimKernel

PAGE = 4096


def plug(xs0, fe: int, be: int, kind: str, devid: int = 0, *,
         backend_kind: str | None = None) -> str:
    """Write the backend and frontend dirs as the toolstack does (dom0 rights); returns the
    backend path.  ``backend_kind`` names the backend dir when it differs from the device's
    (libxl's ``vkb=['backend-type=linux']``: ``backend/vinput`` for ``device/vkbd``)."""
    bp = f"/local/domain/{be}/backend/{backend_kind or kind}/{fe}/{devid}"
    fp = f"/local/domain/{fe}/device/{kind}/{devid}"
    # As libxl: every node of the backend dir owned by the backend domain and readable by the
    # frontend, and the other way round.
    for base, owner, reader, keys in (
            (bp, be, fe, (("frontend", fp), ("frontend-id", fe), ("online", 1), ("state", 1))),
            (fp, fe, be, (("backend", bp), ("backend-id", be), ("state", 1)))):
        xs0.mkdir(base)
        xs0.set_perms(base, [f"n{owner}", f"r{reader}"])
        for k, v in keys:
            xs0.write(f"{base}/{k}", str(v))
            xs0.set_perms(f"{base}/{k}", [f"n{owner}", f"r{reader}"])
    return bp


class ManualKbd:
    def __init__(self, kernel: SimKernel, be: int, devid: int = 0) -> None:
        self.k, self.be = kernel, be
        self.path = f"/local/domain/{kernel.domid}/device/vkbd/{devid}"
        self.frame = kernel.alloc_page()
        self.gref = kernel.grant_foreign_access(be, self.frame)
        self.port = kernel.alloc_unbound(be)

    @property
    def page(self) -> memoryview:
        return self.k.page(self.frame)

    def publish(self, state: XenbusState = XenbusState.Initialised, **override) -> None:
        xs = self.k.xenstore
        keys = {"page-gref": self.gref, "page-ref": self.frame, "event-channel": self.port,
                "request-abs-pointer": 1}
        keys.update(override)
        for k, v in keys.items():
            if v is not None:
                xs.write(f"{self.path}/{k}", str(v))
        xs.write(f"{self.path}/state", str(int(state)))

    def take(self) -> list:
        evs = K.kbd_in_get(self.page)
        self.k.notify(self.port)
        return evs


class ManualFb:
    def __init__(self, kernel: SimKernel, be: int, width: int = 320, height: int = 200,
                 devid: int = 0) -> None:
        self.k, self.be = kernel, be
        self.path = f"/local/domain/{kernel.domid}/device/vfb/{devid}"
        self.width, self.height = width, height
        self.mem_length = width * height * 4
        n = -(-self.mem_length // PAGE)
        self.frames = kernel.alloc_pages(n)
        self.shared = kernel.alloc_page()
        self.dir_frames = kernel.alloc_pages(-(-n * 8 // PAGE))
        page = F.XenfbPage(kernel.page(self.shared), "x86_64-abi")
        for i, d in enumerate(self.dir_frames):
            chunk = self.frames[i * 512:(i + 1) * 512]
            kernel.page(d)[:len(chunk) * 8] = np.asarray(chunk, "<u8").tobytes()
            page.set_pd(i, d)
        page.width, page.height, page.line_length = width, height, width * 4
        page.mem_length, page.depth = self.mem_length, 32
        self.port = kernel.alloc_unbound(be)

    @property
    def page(self) -> F.XenfbPage:
        return F.XenfbPage(self.k.page(self.shared), "x86_64-abi")

    def publish(self, state: XenbusState = XenbusState.Initialised, **override) -> None:
        xs = self.k.xenstore
        keys = {"page-ref": self.shared, "event-channel": self.port, "protocol": "x86_64-abi",
                "feature-update": 1}
        keys.update(override)
        for k, v in keys.items():
            if v is not None:
                xs.write(f"{self.path}/{k}", str(v))
        xs.write(f"{self.path}/state", str(int(state)))

    def draw(self, x: int, y: int, w: int, h: int, color: int, *, send: bool = True) -> None:
        """Fill a rectangle in guest memory and send an UPDATE, like fbfront's fillrect
        (``send=False``: the UPDATE is not sent yet)."""
        for row in range(y, y + h):
            off = row * self.width * 4 + x * 4
            frame_i, start = divmod(off, PAGE)
            data = np.full(w, color, "<u4").tobytes()
            while data:
                chunk = data[:PAGE - start]
                self.k.page(self.frames[frame_i])[start:start + len(chunk)] = chunk
                data = data[len(chunk):]
                frame_i, start = frame_i + 1, 0
        if send:
            self.send(F.XenfbUpdate(x=x, y=y, width=w, height=h))

    def send(self, *events) -> None:
        assert F.fb_out_put(self.page, list(events)) == len(events)
        self.k.notify(self.port)
