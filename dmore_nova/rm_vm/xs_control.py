"""The RM VM's co-migration control channel: dom0 asks, the agent in the RM VM acts, through
xenstore.

Why this exists: on real Xen the RM VM and its guest are each moved by ``xl migrate``, which
dom0 runs (:mod:`dmore_nova.virt.xl_rmvm`).  The agent inside the RM VM cannot see dom0's
toolstack, and dom0 cannot reach into the agent's process; what both see is xenstore.  Two keys
in the RM VM's own domain directory carry the protocol.  They are *relative* paths: xenstored
resolves them per connection, so they follow the RM VM to its new domid when it migrates.

``data/dmore-migrate`` (:data:`REQUEST_KEY`), written by dom0::

    <seq> prepare                 hold viewers' input, let go of every page mapped from the
                                  guest and every bound port (before ``xl migrate`` of the RM
                                  VM: a PV domain with foreign or grant mappings in its page
                                  tables cannot be saved, and its event channels would not
                                  survive anyway)
    <seq> resume                  undo ``prepare`` (the RM VM did not move): re-map the same
                                  pages, re-bind the same ports, replay the held input
    <seq> incoming <domid> <name> after the RM VM moved, while ``xl migrate`` of the guest runs
                                  and dom0 has given us privilege over its incoming domain:
                                  plug that domain's vfb now (before it resumes: the re-probe
                                  trap, :meth:`RMAgent._replug`), wait until xl names it
                                  ``<name>``, re-home, wait for both devices to re-map and
                                  re-bind, replay the held input, refresh the viewers

``<seq>`` is decimal (dom0 uses a clock): a value is a new request when it differs from the
last one seen (dom0 may send the same verb again in a later co-migration).

``data/dmore-migrate-ack`` (:data:`ACK_KEY`), written by the agent: one JSON object with the
request's ``seq`` and a ``state`` -- ``prepared``, ``resumed``, ``plugged`` (an intermediate
state of ``incoming``), ``done`` or ``devices-not-connected`` (re-homed, but the frontends did
not reconnect in time; the held input was replayed into the queue anyway), or ``error`` with
an ``error`` text -- plus timings in seconds.

**Untrusted input.**  Only the RM VM itself and dom0 may write its ``data/`` directory, but
the request is still parsed strictly (:func:`~dmore_nova.rm_vm.control.parse_request`:
length, ASCII, syntax, domid range, a plain domain name).  A malformed, unknown or
out-of-order request (``incoming`` without ``prepare``) gets an ``error`` ack naming what was
wrong and changes nothing; so does a request that comes while another is being worked on.  A
request already in the key when the agent starts is not acted on (it was meant for an agent
that is gone).

:class:`~dmore_nova.rm_vm.control.ControlProtocol` is the sans-IO part (parsing, which
request is allowed in which phase, what the ack says); :class:`XenstoreControl` is the thin
asyncio shell: a xenstore
watch on the request key on its own connection (the agent's connection dispatches only device
tokens), the agent's co-migration hooks, the ack.  ``dmore-rm-agent`` runs one when
``[agent] xenstore_control`` is set.

Limits: one request at a time; ``incoming`` waits at most :data:`RENAME_TIMEOUT` for xl to
rename the domain and :data:`CONNECT_TIMEOUT` for the devices to reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.rm_vm.backends import vfb as vfb_mod
from dmore_nova.rm_vm.control import (
    ACK_KEY,
    MAX_REQUEST,
    REQUEST_KEY,
    Ack,
    ControlProtocol,
    Phase,
    Request,
    Verb,
)
from dmore_nova.xen.api import XenError, XenStore

LOG = logging.getLogger(__name__)

#: Seconds ``incoming`` waits for xl to name the incoming domain like the guest (the end of its
#: memory transfer: minutes under TCG on a loaded machine).
RENAME_TIMEOUT = 600.0
#: Seconds the re-created backends get to connect after the re-home (and after ``resume``).
CONNECT_TIMEOUT = 120.0
#: The rename wait is woken by a watch on the incoming domain's ``name``; it also re-reads the
#: name this often, so that a watch event xenstored does not deliver (it fires only for nodes
#: the watcher may read, and our read access comes through the target dom0 set) costs seconds,
#: not the whole :data:`RENAME_TIMEOUT`.  Which of the two saw the rename is logged.
RENAME_RECHECK = 5.0
_TOKEN = "dmore-control"
_NAME_TOKEN = "dmore-control-name"


class XenstoreControl:
    """The I/O shell: watch the request key, carry out requests on the agent, write acks.

    :param xs: a xenstore connection of the RM VM's own, used for nothing else (its watch fd
        goes on the agent's loop).
    """

    def __init__(self, agent: RMAgent, xs: XenStore, *, rename_timeout: float = RENAME_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.agent = agent
        self.xs = xs
        self.proto = ControlProtocol()
        self.rename_timeout = rename_timeout
        self.connect_timeout = connect_timeout
        #: The last ack written (for status and tests; one, not a history: no growth).
        self.last_ack: Ack | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._name_changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.proto.prime(self.xs.read(REQUEST_KEY))
        except XenError as exc:
            LOG.info("control: reading %s at start: %s", REQUEST_KEY, exc)
        self._loop.add_reader(self.xs.watch_fileno(), self._on_watch)
        self.xs.watch(REQUEST_KEY, _TOKEN)
        LOG.info("control: co-migration requests from dom0 in %s", REQUEST_KEY)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.xs.watch_fileno())
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
        try:
            self.xs.unwatch(REQUEST_KEY, _TOKEN)
        except (XenError, OSError) as exc:
            LOG.debug("control: unwatch: %s", exc)

    @property
    def phase(self) -> Phase:
        return self.proto.phase

    # -- readiness ---------------------------------------------------------------------------
    def _on_watch(self) -> None:
        try:
            events = self.xs.read_watch_events()
        except (XenError, OSError) as exc:
            LOG.warning("control: xenstore watch connection failed: %s", exc)
            if self._loop is not None:
                self._loop.remove_reader(self.xs.watch_fileno())
            return
        tokens = {token for _path, token in events}
        if _NAME_TOKEN in tokens:
            self._name_changed.set()
        if _TOKEN in tokens:
            self.check()

    def check(self) -> None:
        """Read the request key and act on a new value."""
        try:
            raw = self.xs.read(REQUEST_KEY)
            own = self.agent.xen.domid
        except (XenError, OSError) as exc:
            # e.g. during our own resume after a migration; the next event re-reads it
            LOG.info("control: reading the request: %s", exc)
            return
        out = self.proto.on_value(raw, own)
        if out is None:
            return
        LOG.info("control: request %r", raw.decode("ascii", "replace")[:MAX_REQUEST]
                 if raw else raw)
        if isinstance(out, Ack):
            LOG.warning("control: refused: %s", out.fields.get("error"))
            self._ack(out)
            return
        assert self._loop is not None
        self._task = self._loop.create_task(self._run(out))

    def _ack(self, ack: Ack) -> None:
        self.last_ack = ack
        try:
            self.xs.write(ACK_KEY, ack.encode())
        except (XenError, OSError) as exc:
            LOG.warning("control: could not write the ack %s: %s", ack.encode(), exc)
            return
        LOG.info("control: ack %s", ack.encode())

    # -- requests ----------------------------------------------------------------------------
    async def _run(self, req: Request) -> None:
        handler = {Verb.PREPARE: self._prepare, Verb.RESUME: self._resume,
                   Verb.INCOMING: self._incoming}[req.verb]
        try:
            ack = await handler(req)
        except Exception as exc:  # noqa: BLE001 - reported to dom0; the agent goes on
            LOG.exception("control: %s failed", req.verb.value)
            ack = self.proto.failed(req, self.proto.phase, f"{type(exc).__name__}: {exc}")
        self._ack(ack)

    async def _prepare(self, req: Request) -> Ack:
        t0 = time.monotonic()
        a = self.agent
        was = self.proto.phase
        a.release_devices()
        return self.proto.finished(req, Phase.PREPARED, "prepared", domid=a.xen.domid,
                                   held=len(a.held), already=was is Phase.PREPARED,
                                   seconds=round(time.monotonic() - t0, 3))

    async def _resume(self, req: Request) -> Ack:
        t0 = time.monotonic()
        a = self.agent
        if self.proto.phase is Phase.SERVING:
            return self.proto.finished(req, Phase.SERVING, "resumed", noop=True, replayed=0,
                                       seconds=0.0)
        reconnected = a.reconnect_devices()
        ok = await a.wait_until(a.devices_connected, self.connect_timeout)
        replayed = a.thaw()
        viewers = a.refresh()
        return self.proto.finished(req, Phase.SERVING, "resumed", noop=False,
                                   reconnected=reconnected, connected=ok, replayed=replayed,
                                   viewers=viewers, seconds=round(time.monotonic() - t0, 3))

    async def _incoming(self, req: Request) -> Ack:
        assert req.domid is not None and req.name is not None
        a = self.agent
        new, me = req.domid, a.xen.domid
        t0 = time.monotonic()
        plugged = False
        if a.plug_vfb:
            vfb_mod.plug(self.xs, me, new, a.devid)
            plugged = True
            LOG.info("control: plugged the vfb of incoming dom%d (backend dom%d)", new, me)
        self._ack(Ack(req.seq, "plugged", {"new": new, "backend": me, "vfb": plugged,
                                           "seconds": round(time.monotonic() - t0, 3)}))
        try:
            renamed = await self._wait_renamed(new, req.name)
        except (XenError, OSError) as exc:
            renamed, why = False, f"reading dom{new}'s name: {exc}"
        else:
            why = (f"dom{new} not named {req.name!r} after {self.rename_timeout:.0f} s")
        if not renamed:
            if plugged:
                try:
                    vfb_mod.unplug(self.xs, me, new, a.devid)
                except (XenError, OSError) as exc:
                    LOG.info("control: unplug the incoming vfb: %s", exc)
            return self.proto.failed(req, Phase.PREPARED, why)
        t_started = time.monotonic()
        old = a.guest_domid
        a.rehome(a.xen, new)
        # serving the new guest from here on, whatever fails next (an error ack says what)
        self.proto.phase = Phase.SERVING
        ok = await a.wait_until(a.devices_connected, self.connect_timeout)
        t_conn = time.monotonic()
        replayed = a.thaw()
        viewers = a.refresh()
        return self.proto.finished(
            req, Phase.SERVING, "done" if ok else "devices-not-connected", old=old, new=new,
            backend=me, replayed=replayed, viewers=viewers, held_dropped=a.held_dropped,
            vkbd_dropped=a.vkbd.dropped, requeued=a.requeued_input,
            abs_pointer=a.vkbd.abs_pointer, rehomes=a.rehomes,
            wait_rename=round(t_started - t0, 3), connect=round(t_conn - t_started, 3))

    async def _wait_renamed(self, domid: int, name: str) -> bool:
        """Until ``/local/domain/<domid>/name`` is ``name`` (xl renames the incoming domain
        right before it unpauses it), woken by a watch on that node."""
        path = f"/local/domain/{domid}/name"
        want = name.encode()
        deadline = time.monotonic() + self.rename_timeout
        self._name_changed.clear()
        self.xs.watch(path, _NAME_TOKEN)
        try:
            while self.xs.read(path) != want:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._name_changed.wait(),
                                           min(remaining, RENAME_RECHECK))
                except TimeoutError:
                    if self.xs.read(path) == want:
                        LOG.warning("control: dom%d's rename seen by re-reading, no watch "
                                    "event", domid)
                        return True
                    continue
                self._name_changed.clear()
            LOG.info("control: dom%d named %r", domid, name)
            return True
        finally:
            try:
                self.xs.unwatch(path, _NAME_TOKEN)
            except (XenError, OSError) as exc:
                LOG.debug("control: unwatch %s: %s", path, exc)
