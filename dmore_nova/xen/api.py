"""The one hypervisor interface the RM VM's backends use, with two implementations behind it.

Modelled on Nova's ``virt/driver.py``: callers hold a :class:`Xen` object and never learn whether
it is real Xen (``dmore_nova.xen.real``: pyxs + ctypes over libxenevtchn/libxengnttab/
libxenforeignmemory) or the userspace simulator (``dmore_nova.xen.sim``).  The shapes follow Xen's
own libraries (``xenevtchn_*``, ``xengnttab_map_grant_ref``, ``xenforeignmemory_map``, xenstore
ops) so that the real implementation is a thin veneer and the sim's semantics are checkable
against the real one.

Everything here is synchronous and cheap except waiting, which is done by readiness: the event
channel handle and the xenstore watch connection each expose ``fileno()`` for the asyncio loop.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

XC_PAGE_SIZE = 4096


class XenError(OSError):
    """A hypervisor or xenstore operation failed; ``errno`` carries the Xen/POSIX error."""


class XenUnavailable(XenError):
    """The implementation cannot work here (no /dev/xen, a library missing): raised at use,
    never at import."""


class XenstoreConflict(XenError):
    """A transaction lost a race (EAGAIN at TRANSACTION_END): retry it."""


# -- xenstore ------------------------------------------------------------------------------------

class Transaction(abc.ABC):
    @abc.abstractmethod
    def read(self, path: str) -> bytes | None: ...

    @abc.abstractmethod
    def write(self, path: str, value: bytes | str) -> None: ...

    @abc.abstractmethod
    def rm(self, path: str) -> None: ...

    @abc.abstractmethod
    def directory(self, path: str) -> list[str]: ...

    @abc.abstractmethod
    def mkdir(self, path: str) -> None: ...

    @abc.abstractmethod
    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        """Toolstacks create a device's nodes *and* their permissions in one transaction, so
        no node is ever visible to the guest with its parent's permissions."""


class XenStore(abc.ABC):
    """xenstore as a backend sees it (docs/misc/xenstore.txt).  Reads return ``None`` for a
    missing node (ENOENT is normal in the xenbus handshake, not an error)."""

    @abc.abstractmethod
    def read(self, path: str) -> bytes | None: ...

    @abc.abstractmethod
    def write(self, path: str, value: bytes | str) -> None: ...

    @abc.abstractmethod
    def mkdir(self, path: str) -> None: ...

    @abc.abstractmethod
    def rm(self, path: str) -> None:
        """Remove ``path`` and its children; a missing node is not an error."""

    @abc.abstractmethod
    def directory(self, path: str) -> list[str]:
        """Child names; ``[]`` for a missing node."""

    @abc.abstractmethod
    def get_perms(self, path: str) -> list[str]: ...

    @abc.abstractmethod
    def set_perms(self, path: str, perms: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def get_domain_path(self, domid: int) -> str: ...

    @abc.abstractmethod
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One transaction; raises :class:`XenstoreConflict` at the end if it lost a race."""

    def run_transaction(self, fn: Callable[[Transaction], T], attempts: int = 16) -> T:
        """Run ``fn`` in a transaction, retrying on conflict (as libxenstore users do)."""
        for _ in range(attempts - 1):
            try:
                with self.transaction() as t:
                    return fn(t)
            except XenstoreConflict:
                continue
        with self.transaction() as t:
            return fn(t)

    @abc.abstractmethod
    def watch(self, path: str, token: str) -> None:
        """Register a watch; events arrive through :meth:`read_watch_events`.  Xen fires every
        new watch once immediately, so callers must treat the first event as 'check now'."""

    @abc.abstractmethod
    def unwatch(self, path: str, token: str) -> None: ...

    @abc.abstractmethod
    def watch_fileno(self) -> int:
        """Readable when watch events are pending (for ``loop.add_reader``)."""

    @abc.abstractmethod
    def read_watch_events(self) -> list[tuple[str, str]]:
        """Pending ``(path, token)`` events, without blocking."""

    @abc.abstractmethod
    def close(self) -> None: ...


# -- memory ----------------------------------------------------------------------------------------

class Mapping(abc.ABC):
    """Guest pages mapped into this process.  ``mem`` stays valid until :meth:`unmap`."""

    mem: memoryview

    @abc.abstractmethod
    def unmap(self) -> None: ...

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmap()


# -- event channels --------------------------------------------------------------------------------

class EventChannels(abc.ABC):
    """A ``xenevtchn_handle``: ports bound through it become pending on one pollable fd.

    Protocol (as libxenevtchn): when ``fileno()`` is readable, call :meth:`pending` to take one
    fired port, handle it, then :meth:`unmask` it so it can fire again.
    """

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to ``remote_port`` of ``domid``; returns the local port."""

    @abc.abstractmethod
    def notify(self, port: int) -> None: ...

    @abc.abstractmethod
    def pending(self) -> int | None:
        """One fired local port, or None if nothing is pending (never blocks)."""

    @abc.abstractmethod
    def unmask(self, port: int) -> None: ...

    def pending_ports(self, limit: int = 64) -> list[int]:
        """Up to ``limit`` fired ports at once, in firing order ([] if none; never blocks).

        Why beside :meth:`pending`: each call is a system call, and in a PV dom0 or RM VM
        under emulation a system call costs tens of microseconds or more; an implementation
        that can take several ports in one call (Linux's evtchn device returns as many as
        the read asks for) overrides this.  The fd is level-triggered: ports beyond
        ``limit`` keep it readable."""
        ports: list[int] = []
        while len(ports) < limit:
            port = self.pending()
            if port is None:
                break
            ports.append(port)
        return ports

    def unmask_ports(self, ports: Sequence[int]) -> None:
        """:meth:`unmask` each of ``ports`` (one call where the implementation can).  A port
        that cannot be unmasked (unbound meanwhile) does not stop the others; the first
        error is raised after all were tried."""
        first: XenError | None = None
        for port in ports:
            try:
                self.unmask(port)
            except XenError as exc:
                first = first or exc
        if first is not None:
            raise first

    @abc.abstractmethod
    def unbind(self, port: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


# -- domains ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DomainInfo:
    domid: int
    name: str
    dying: bool = False
    paused: bool = False
    max_pages: int = 0


class Xen(abc.ABC):
    """Everything a backend needs from the hypervisor, for the domain this process runs in."""

    xenstore: XenStore

    @property
    @abc.abstractmethod
    def domid(self) -> int:
        """The domain this code runs in (0 in dom0, the RM VM's domid inside an RM VM)."""

    @abc.abstractmethod
    def map_grant(self, domid: int, gref: int, writable: bool = True) -> Mapping:
        """Map one page ``domid`` granted to us (``xengnttab_map_grant_ref``).  Fails with EPERM
        unless the grant entry names our domid and permits the access."""

    @abc.abstractmethod
    def map_foreign(self, domid: int, frames: Sequence[int], writable: bool = False) -> Mapping:
        """Map ``domid``'s frames (``xenforeignmemory_map``).  Only with privilege over ``domid``:
        dom0, or the domain ``domid`` was given as target (``XEN_DOMCTL_set_target``)."""

    @abc.abstractmethod
    def event_channels(self) -> EventChannels:
        """A new event-channel handle (``xenevtchn_open``)."""

    @abc.abstractmethod
    def domain_info(self, domid: int) -> DomainInfo | None:
        """None if the domain does not exist."""

    def close(self) -> None:
        self.xenstore.close()
