"""``RealXen``: the :class:`~dmore_nova.xen.api.Xen` of a process running in a real Xen domain
(dom0, or the RM VM as a domU).

xenstore comes from pyxs (:class:`~dmore_nova.xen.pyxs_store.PyxsXenStore`); grant maps, foreign
maps and event channels from Xen's own libraries through ctypes (:mod:`.libs`).  Library handles
are opened on first use, so constructing a ``RealXen`` needs only xenstore.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Sequence

from pyxs.connection import _get_unix_socket_path

from dmore_nova.xen import api
from dmore_nova.xen.pyxs_store import PyxsXenStore
from dmore_nova.xen.real import libs
from dmore_nova.xen.real.evtchn import RealEventChannels, check_domid
from dmore_nova.xen.real.foreignmemory import ForeignMemory
from dmore_nova.xen.real.gnttab import GrantTable

LOG = logging.getLogger(__name__)

#: Where Linux says whether this domain is the control domain ("control_d").
CAPABILITIES_PATH = "/proc/xen/capabilities"


def is_control_domain(capabilities_path: str = CAPABILITIES_PATH) -> bool:
    """True in dom0 (xenfs's ``capabilities`` reads ``control_d``)."""
    try:
        with open(capabilities_path, "rb") as f:
            return b"control_d" in f.read(64)
    except OSError:
        return False


def connect_xenstore() -> api.XenStore:
    """xenstore as this domain reaches it: xenstored's unix socket when it runs here (dom0),
    else the kernel's xenbus device (a domU such as the RM VM)."""
    socket_path = _get_unix_socket_path()
    if os.path.exists(socket_path):
        return PyxsXenStore(unix_socket_path=socket_path)
    return PyxsXenStore(xen_bus_path="")


class RealXen(api.Xen):
    """Real Xen for the domain this process runs in.

    :param xenstore: the store to use; default :func:`connect_xenstore`.
    :param evtchn_lib, gnttab_lib, foreignmemory_lib, xenctrl_lib: the libraries (tests point
        them at missing names to check the "not available" path).
    :param capabilities_path: for tests.
    """

    def __init__(self, xenstore: api.XenStore | None = None, *,
                 evtchn_lib: libs.XenLibrary | None = None,
                 gnttab_lib: libs.XenLibrary | None = None,
                 foreignmemory_lib: libs.XenLibrary | None = None,
                 xenctrl_lib: libs.XenLibrary | None = None,
                 capabilities_path: str = CAPABILITIES_PATH) -> None:
        self.xenstore = xenstore if xenstore is not None else connect_xenstore()
        self._evtchn_lib = evtchn_lib or libs.EVTCHN
        self._gnttab = GrantTable(gnttab_lib)
        self._fmem = ForeignMemory(foreignmemory_lib)
        self._capabilities_path = capabilities_path
        self._xenctrl_lib = xenctrl_lib or libs.XENCTRL
        self._xc: int | None = None
        self._xc_failed = False

    @property
    def domid(self) -> int:
        """Read from xenstore every time: the RM VM's domid changes when it migrates.

        ``~/domid`` is "the domain's own ID" (Xen ``docs/misc/xenstore-paths.pandoc``); the
        relative path ``domid`` resolves to our own domain's directory.  If the node is missing
        in the control domain, it is dom0.
        """
        raw = self.xenstore.read("domid")
        if raw is None:
            if is_control_domain(self._capabilities_path):
                return 0
            raise api.XenError(errno.ENOENT, "xenstore has no 'domid' for this domain")
        try:
            domid = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as e:
            raise api.XenError(errno.EINVAL, f"xenstore 'domid' is not a number: {raw!r}") from e
        return check_domid(domid)

    def map_grant(self, domid: int, gref: int, writable: bool = True) -> api.Mapping:
        return self._gnttab.map_grant_ref(domid, gref, writable)

    def map_foreign(self, domid: int, frames: Sequence[int],
                    writable: bool = False) -> api.Mapping:
        return self._fmem.map(domid, frames, writable)

    def event_channels(self) -> api.EventChannels:
        return RealEventChannels(self._evtchn_lib)

    def domain_info(self, domid: int) -> api.DomainInfo | None:
        """Existence and name from xenstore; state from the hypervisor when we may ask.

        The domain exists while ``/local/domain/<id>`` does (libxl creates it with the domain,
        xenstored removes it on release); the name is only known to xenstore.  ``dying``,
        ``paused`` and ``max_pages`` need ``XEN_DOMCTL_getdomaininfo`` (through libxenctrl's
        ``xc_domain_getinfo``), which the default XSM policy (``XSM_XS_PRIV``) grants to the
        control domain, the xenstore domain and a domain given ``set_target`` over ``domid``
        -- the RM VM over its guest.  When that is not available (no libxenctrl 4.17, no
        privcmd, EPERM) they keep their defaults.  If the hypervisor says the domain does not
        exist, that wins over a stale xenstore directory.  A domain we may not read in xenstore
        raises ``XenError(EACCES)``.
        """
        check_domid(domid)
        state = self._hypervisor_info(domid)
        if state is False:
            return None
        path = self.xenstore.get_domain_path(domid)
        name = self.xenstore.read(f"{path}/name")
        if name is None:
            # Being built (name not written yet) or gone: only the directory tells.
            if state is None and not self.xenstore.directory(path):
                return None
            name = b""
        info = api.DomainInfo(domid=domid, name=name.decode("utf-8", "replace"))
        if state is not None:
            info = api.DomainInfo(domid=domid, name=info.name, dying=bool(state.dying),
                                  paused=bool(state.paused),
                                  max_pages=int(state.max_memkb) * 1024 // api.XC_PAGE_SIZE)
        return info

    def _hypervisor_info(self, domid: int) -> libs.XcDominfoPrefix | None | bool:
        """The domain's ``xc_dominfo_t``; False if Xen says it does not exist; None if we
        cannot ask (logged once, then not retried)."""
        if self._xc_failed:
            return None
        if self._xc is None:
            try:
                handle = self._xenctrl_lib.call("xc_interface_open", None, None, 0)
            except api.XenUnavailable as e:
                LOG.info("domain state from xenstore only: %s", e)
                self._xc_failed = True
                return None
            if not handle:
                LOG.info("domain state from xenstore only: xc_interface_open failed (%s)",
                         errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
                self._xc_failed = True
                return None
            self._xc = handle  # type: ignore[assignment]
        buf = ctypes.create_string_buffer(libs.XC_DOMINFO_BUFSIZE)
        ctypes.set_errno(0)
        n = self._xenctrl_lib.call("xc_domain_getinfo", self._xc, domid, 1, buf)
        if n < 0:  # type: ignore[operator]
            # EPERM: not ours to ask (or no such domain, which Xen does not tell us apart).
            return None
        info = libs.XcDominfoPrefix.from_buffer_copy(buf)
        if n == 0 or info.domid != domid:  # getinfo returns the next domain up
            return False
        return info

    def close(self) -> None:
        try:
            self._gnttab.close()
            self._fmem.close()
            xc, self._xc = self._xc, None
            if xc is not None:
                self._xenctrl_lib.call("xc_interface_close", xc)
        finally:
            super().close()
