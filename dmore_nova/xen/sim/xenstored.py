"""The simulated ``xenstored``: unix sockets speaking xs_wire over :class:`~.xenstore.Xenstore`.

A thin asyncio layer: bytes from a socket go through :class:`~dmore_nova.xen.io.xs_wire.Decoder`
into :meth:`Connection.handle`, and whatever the store queues on a connection (replies, watch
events caused by anyone) is written to that connection's socket.  Unmodified clients of the real
daemon work against it: ``pyxs.Client(unix_socket_path=...)``, ``xenstore-*`` with
``XENSTORED_PATH``.

Who a client *is* depends on which socket it came through, the way it does on a Xen host:

* :meth:`XenstoreServer.serve` -- the daemon's own socket (``/var/run/xenstored/socket``): every
  client is a dom0 tool, privileged, relative paths under ``/local/domain/0``;
* :meth:`XenstoreServer.serve_domain_socket` -- one socket per simulated domain: every client is
  that domain's xenbus ring (unprivileged, quotas apply, relative paths under
  ``/local/domain/<domid>``).  This is how a sim guest or a sim RM VM "is" a domU.

A client that breaks framing (a header announcing more than ``XENSTORE_PAYLOAD_MAX``) is dropped
with a logged reason, as C xenstored's ``ignore_connection`` does; so is one that stops reading
while output piles up past ``max_write_buffer``.  Everyone else carries on.

The supervisor-facing API (:meth:`introduce_domain`, :meth:`release_domain`,
:meth:`shutdown_domain`, :meth:`set_target`, :attr:`store`) must be called on the server's event
loop thread, like everything asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field

from dmore_nova.xen.io.xs_wire import Decoder, ProtocolError
from dmore_nova.xen.sim.xenstore import DOMID_FIRST_RESERVED, Connection, Quotas, Xenstore

__all__ = ["XenstoreServer", "main"]

LOG = logging.getLogger(__name__)

#: Connections accepted at once, over all sockets of one server.
DEFAULT_MAX_CONNECTIONS = 1024
#: Bytes a connection may have waiting in its socket's send buffer before it is dropped as
#: not reading (C xenstored bounds the same thing with its per-domain memory quota).
DEFAULT_MAX_WRITE_BUFFER = 4 * 1024 * 1024


class _XsProtocol(asyncio.Protocol):
    """One client socket."""

    def __init__(self, server: XenstoreServer, listener: _Listener) -> None:
        self.server = server
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.decoder = Decoder(server.store.quotas.max_request_size)
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server, lst = self.server, self.listener
        if len(server._protocols) >= server.max_connections:
            LOG.warning("xenstored: refusing connection on %s: %d connections open",
                        lst.path, len(server._protocols))
            self.closing = True
            transport.abort()
            return
        try:
            self.conn = server.store.connect(
                lst.domid, privileged=lst.privileged, domain_conn=lst.domain_conn,
                notify=self._flush, on_close=self._closed_by_store,
                label=f"{os.path.basename(lst.path)}#{server._next_label()}")
        except Exception as e:  # e.g. the domain was released meanwhile
            LOG.warning("xenstored: refusing connection on %s: %s", lst.path, e)
            self.closing = True
            transport.abort()
            return
        server._protocols.add(self)
        lst.protocols.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.conn is None:
            return
        try:
            messages = self.decoder.feed(data)
        except ProtocolError as e:
            self.drop(f"protocol error: {e}")
            return
        for msg in messages:
            if self.closing:
                break
            self.conn.handle(msg)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None and not self.closing and self.decoder.buffered:
            LOG.info("xenstored: %r went away in the middle of a message (%d bytes)",
                     self.conn, self.decoder.buffered)
        self.closing = True
        self._forget("connection closed")

    def _forget(self, reason: str) -> None:
        self.server._protocols.discard(self)
        self.listener.protocols.discard(self)
        if self.conn is not None:
            self.server.store.disconnect(self.conn, reason)

    def _flush(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or self.closing:
            return
        while conn.outbox:
            transport.write(conn.outbox.popleft().encode())
        if transport.get_write_buffer_size() > self.server.max_write_buffer:
            self.drop(f"client not reading ({transport.get_write_buffer_size()} bytes queued)")

    def _closed_by_store(self, reason: str) -> None:
        """The store closed the connection (domain released, output overflow): the socket
        goes too, after what was already queued for it."""
        if self.closing:
            return
        self.closing = True
        LOG.info("xenstored: closing %r: %s", self.conn, reason)
        if self.transport is not None:
            self.transport.close()
        self._forget(reason)

    def drop(self, reason: str) -> None:
        """Malformed or abusive client: log, discard its output, close (only this one)."""
        if self.closing:
            return
        self.closing = True
        LOG.warning("xenstored: dropping %r: %s", self.conn, reason)
        if self.transport is not None:
            self.transport.abort()
        self._forget(reason)


@dataclass(eq=False)
class _Listener:
    path: str
    domid: int
    privileged: bool
    domain_conn: bool
    server: asyncio.AbstractServer | None = None
    protocols: set[_XsProtocol] = field(default_factory=set)


class XenstoreServer:
    """The daemon: one :class:`Xenstore`, any number of listening sockets."""

    def __init__(self, store: Xenstore | None = None, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER) -> None:
        self.store = store if store is not None else Xenstore()
        self.max_connections = max_connections
        self.max_write_buffer = max_write_buffer
        self._listeners: dict[str, _Listener] = {}
        self._protocols: set[_XsProtocol] = set()
        self._label = 0
        self.store.release_hooks.append(self._domain_released)

    def _next_label(self) -> int:
        self._label += 1
        return self._label

    # -- sockets -------------------------------------------------------------------------------

    async def serve(self, path: str) -> None:
        """Listen on ``path`` as the daemon's socket: clients are dom0 tools."""
        await self._listen(_Listener(path, 0, True, False))

    async def serve_domain_socket(self, domid: int, path: str, *,
                                  privileged: bool = False) -> None:
        """Listen on ``path`` as ``domid``'s xenbus: every client acts as that domain (as a
        guest kernel's ``/dev/xen/xenbus`` does).  The domain must be introduced first
        (:meth:`introduce_domain`); releasing it closes the socket and its clients."""
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} is not a guest domain")
        if not self.store.is_domain_introduced(domid):
            raise ValueError(f"domain {domid} is not introduced")
        await self._listen(_Listener(path, domid, privileged, True))

    async def _listen(self, lst: _Listener) -> None:
        if lst.path in self._listeners:
            raise ValueError(f"already listening on {lst.path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lst.path)  # as xenstored's init_sockets: a stale socket file is ours
        loop = asyncio.get_running_loop()
        lst.server = await loop.create_unix_server(
            lambda: _XsProtocol(self, lst), path=lst.path)
        os.chmod(lst.path, 0o600)
        self._listeners[lst.path] = lst
        LOG.info("xenstored: listening on %s as dom%d%s", lst.path, lst.domid,
                 " (domain socket)" if lst.domain_conn else "")

    async def stop_socket(self, path: str) -> None:
        """Stop listening on ``path`` and drop its clients."""
        lst = self._listeners.pop(path, None)
        if lst is None:
            return
        self._close_listener(lst, "socket closed")
        if lst.server is not None:
            await lst.server.wait_closed()

    def _close_listener(self, lst: _Listener, reason: str) -> None:
        if lst.server is not None:
            lst.server.close()
        for proto in list(lst.protocols):
            proto._closed_by_store(reason)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lst.path)

    @property
    def socket_paths(self) -> list[str]:
        return list(self._listeners)

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.store.release_hooks.remove(self._domain_released)
        for path in list(self._listeners):
            await self.stop_socket(path)

    # -- supervisor API ------------------------------------------------------------------------

    def introduce_domain(self, domid: int) -> bool:
        """``XS_INTRODUCE`` from the toolstack: fires ``@introduceDomain`` the first time."""
        return self.store.introduce_domain(domid)

    def release_domain(self, domid: int) -> None:
        """The domain is gone: its clients are cut off, its nodes go, ``@releaseDomain``
        fires (see :meth:`Xenstore.release_domain`), and its sockets stop listening -- the
        same as when a toolstack client sends ``XS_RELEASE``."""
        self.store.release_domain(domid)

    def _domain_released(self, domid: int) -> None:
        for lst in [lst for lst in self._listeners.values()
                    if lst.domain_conn and lst.domid == domid]:
            del self._listeners[lst.path]
            self._close_listener(lst, f"domain {domid} released")

    def shutdown_domain(self, domid: int) -> None:
        self.store.shutdown_domain(domid)

    def resume_domain(self, domid: int) -> None:
        self.store.resume_domain(domid)

    def set_target(self, domid: int, target: int) -> None:
        self.store.set_target(domid, target)


async def _amain(args: argparse.Namespace) -> None:
    quotas = Quotas(max_nodes_per_domain=args.entry_nb, max_node_size=args.entry_size,
                    max_watches_per_domain=args.watch_nb,
                    max_transactions_per_domain=args.transaction)
    server = XenstoreServer(Xenstore(quotas))
    await server.serve(args.socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m dmore_nova.xen.sim.xenstored --socket PATH``: a standalone sim daemon
    (options named after C xenstored's)."""
    p = argparse.ArgumentParser(description="simulated xenstored (dom0 socket only)")
    p.add_argument("--socket", required=True, help="unix socket path to listen on")
    p.add_argument("-E", "--entry-nb", type=int, default=Quotas.max_nodes_per_domain)
    p.add_argument("-S", "--entry-size", type=int, default=Quotas.max_node_size)
    p.add_argument("-W", "--watch-nb", type=int, default=Quotas.max_watches_per_domain)
    p.add_argument("-t", "--transaction", type=int,
                   default=Quotas.max_transactions_per_domain)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_amain(args))


if __name__ == "__main__":
    main()
