"""Following ``xl migrate`` through xenstore: the real-Xen migration platform of a dom0 RM agent.

Why this exists: on the sim, :mod:`dmore_nova.rm_vm.comigration` drives the guest's migration
itself, phase by phase.  On real Xen the migration is ``xl migrate``, one monolithic command
the agent does not run; but every step of it that matters to the console is visible in
xenstore, and a dom0-hosted agent can follow a *localhost* migration from there, with the
agent's own co-migration hooks (:meth:`RMAgent.freeze`, :meth:`~RMAgent.rehome`,
:meth:`~RMAgent.thaw`, :meth:`~RMAgent.refresh`).

What xl (Xen 4.17, ``xl migrate -s "" guest "xl migrate-receive"``) writes, in the order seen on
the xenbox (``shared/notes/xenbox.md``), and what each observation means:

1. ``/local/domain/<old>/control/shutdown`` becomes ``suspend`` (libxl's request), then ``""``
   (the guest's acknowledgement, which may be the first value we read: watch events coalesce):
   the *suspend was requested*.  Input is held in order from here on (:meth:`RMAgent.freeze`);
   keys written into the ring after this point could land in a page the resumed frontend
   zeroes.  Another request (``poweroff``, ``reboot``, ...) followed by ``""`` is not a suspend.
2. ``@introduceDomain`` fires and a domain named ``<name>--incoming`` exists: the receiving
   side's *incoming domain* (paused; seen 1.5 s after the suspend request: libxl introduces
   the restored domain to xenstored once its memory arrived).  Its vfb is plugged now, so the
   resumed xen-fbfront finds ``device/vfb/<devid>`` and reconnects (plugged after the resume,
   Linux keeps its stale vfb device and never probes the new node).  The domains are also
   looked at on the suspend request, in case the name came after the introduction.
3. The incoming domain's ``name`` becomes ``<name>``: xl renamed it and unpauses it right after
   (``migrate_receive``: rename, then unpause; the unpause itself is not in xenstore).  The old
   domain is suspended for good by then.  The agent *re-homes* to the new domid (new backends;
   what the old frontend had not consumed from its ring is re-queued, see
   :meth:`RMAgent.rehome`), waits until both devices are re-mapped and re-bound, replays the
   held input (:meth:`RMAgent.thaw`) and refreshes the viewers.
4. The source's vinput backend gets ``online=0`` (and ``state=5``): libxl tears the old
   device down and waits 10 s for ``state=6`` before removing it ("unable to remove device"
   otherwise).  The old backend belongs to no live backend object any more; it is *answered
   with Closed* here.
5. ``@releaseDomain`` while the incoming domain is gone and was never started: the migration
   failed and the guest runs on at the source (its suspend was cancelled): input is thawed
   there.

The decisions are made by :class:`XlMigrationTracker` from observations only (no I/O: the unit
tests drive it with recorded xenstore sequences); :class:`XlMigrationFollower` reads xenstore,
feeds the tracker and runs the agent's hooks.  ``dmore-rm-agent`` runs one when
``[agent] follow_xl_migrate`` is set.

Limits: a localhost migration only (a dom0 agent cannot follow its guest to another host: the
RM VM does that); one guest per agent, identified by its xl name; a suspend that no incoming
domain on this host follows (``xl save``, a migration to another host) leaves input held until
the agent stops (the freeze is logged); an incoming domain that goes away before it is started
thaws it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmore_nova.rm_vm.agent import RMAgent
from dmore_nova.rm_vm.backends import vfb as vfb_mod
from dmore_nova.xen.api import XenError, XenStore

LOG = logging.getLogger(__name__)

#: Seconds the re-created backends get to re-map and re-bind after the guest was started at
#: the destination; held input is replayed afterwards in any case (it then waits in the vkbd
#: queue until the frontend connects).
CONNECT_TIMEOUT = 60.0
#: Suffix xl gives the receiving domain until it runs (``migrate_receive``'s
#: ``migration_domname``).
INCOMING_SUFFIX = "--incoming"
#: ``control/shutdown`` values that are requests other than suspend (libxl
#: ``libxl__domain_pvcontrol``; the guest answers each by writing "").
OTHER_REQUESTS = frozenset({b"poweroff", b"reboot", b"halt", b"crash", b"s3"})
#: XenbusState Closing / Closed as xenstore values.
CLOSING, CLOSED = b"5", b"6"
#: Follower events kept for the status (the oldest are dropped).
MAX_EVENTS = 1000


# -- the decisions (sans-IO) -----------------------------------------------------------------

@dataclass(frozen=True)
class Freeze:
    """Hold viewers' input: the guest was asked to suspend."""

    domid: int
    value: str


@dataclass(frozen=True)
class PlugIncoming:
    """The incoming domain exists: plug its vfb and watch its name."""

    domid: int


@dataclass(frozen=True)
class Rehome:
    """The incoming domain was renamed to the guest's name and is being started."""

    old: int
    new: int


@dataclass(frozen=True)
class AnswerClosed:
    """libxl tears down an old backend (online=0): write state Closed."""

    path: str


@dataclass(frozen=True)
class ThawAtSource:
    """The incoming domain went away before it was started: the guest runs on here."""

    domid: int


Action = Freeze | PlugIncoming | Rehome | AnswerClosed | ThawAtSource


class XlMigrationTracker:
    """Which xenstore observations mean which migration step, for the guest named ``name``
    currently ``domid``.  Each ``on_*`` method takes what was read after a watch fired and
    returns the actions to take (possibly none); the caller reports the completed re-home
    with :meth:`rehomed`.  Values are raw xenstore bytes (``None``: node missing)."""

    def __init__(self, name: str, domid: int) -> None:
        if not name:
            raise ValueError("the guest's xl name is needed to recognise its incoming domain")
        self.name = name
        self.domid = domid
        self.incoming: int | None = None
        self.suspend_requested = False
        self.rehoming = False
        self._last_request: bytes | None = None

    @property
    def incoming_name(self) -> bytes:
        return f"{self.name}{INCOMING_SUFFIX}".encode()

    def on_shutdown(self, domid: int, value: bytes | None) -> list[Action]:
        """``/local/domain/<domid>/control/shutdown`` changed and now reads ``value``."""
        if domid != self.domid or self.suspend_requested or value is None:
            return []
        if value == b"":
            # The guest answered a request.  The request itself may never have been read
            # (coalesced watch events): unless we saw it was another one, it was a suspend.
            request, self._last_request = self._last_request, None
            if request not in (None, b"suspend"):
                return []
        elif value != b"suspend":
            self._last_request = value
            return []
        self.suspend_requested = True
        return [Freeze(domid, value.decode("utf-8", "replace"))]

    def on_domains(self, names: dict[int, bytes | None]) -> list[Action]:
        """``@introduceDomain`` fired; ``names``: every domain's ``name`` node."""
        if self.incoming is not None or self.rehoming:
            return []
        for domid, name in sorted(names.items()):
            if domid not in (0, self.domid) and name == self.incoming_name:
                self.incoming = domid
                return [PlugIncoming(domid)]
        return []

    def on_name(self, domid: int, value: bytes | None) -> list[Action]:
        """The incoming domain's ``name`` changed."""
        if domid != self.incoming or self.rehoming or value != self.name.encode():
            return []
        self.rehoming = True
        return [Rehome(self.domid, domid)]

    def on_released(self, live: set[int]) -> list[Action]:
        """``@releaseDomain`` fired; ``live``: domids that still have a xenstore dir."""
        if self.incoming is None or self.rehoming or self.incoming in live:
            return []
        self.incoming = None
        if self.suspend_requested:
            self.suspend_requested = False
            self._last_request = None
            return [ThawAtSource(self.domid)]
        return []

    def on_old_backend(self, path: str, online: bytes | None,
                       state: bytes | None) -> list[Action]:
        """An old backend dir (``path``, left behind by a re-home) changed."""
        if online == b"0" and state is not None and state != CLOSED:
            return [AnswerClosed(path)]
        return []

    def rehomed(self, new: int) -> None:
        """The agent serves ``new`` now; the next migration starts from scratch."""
        self.domid = new
        self.incoming = None
        self.suspend_requested = self.rehoming = False
        self._last_request = None


# -- the I/O shell ---------------------------------------------------------------------------

class XlMigrationFollower:
    """Follows ``xl migrate`` of ``agent``'s guest through its own xenstore connection ``xs``
    (the agent's watch connection dispatches only the agent's tokens) and drives the agent.

    ``name``: the guest's xl name (default: read from xenstore at :meth:`start`).
    ``on_step``: called after every step (the status file is rewritten from it).
    Runs on the agent's event loop; :meth:`start` after :meth:`RMAgent.start`.
    """

    def __init__(self, agent: RMAgent, xs: XenStore, name: str | None = None, *,
                 on_step: Callable[[], None] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.agent = agent
        self.xs = xs
        self.name = name
        self.on_step = on_step
        self.connect_timeout = connect_timeout
        self.tracker: XlMigrationTracker | None = None
        self.events: list[dict[str, Any]] = []
        self.migrations = 0
        self._watches: list[tuple[str, str]] = []
        self._fresh: set[str] = set()  # tokens whose initial firing is still to come
        self._old_backends: set[str] = set()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- status ----------------------------------------------------------------------------
    def note(self, what: str, **kw: Any) -> None:
        self.events.append({"t": time.time(), "what": what, **kw})
        del self.events[:-MAX_EVENTS]
        LOG.info("xl follower: %s %s", what, kw)
        if self.on_step is not None:
            self.on_step()

    def status(self) -> dict[str, Any]:
        t = self.tracker
        return {"migrations": self.migrations, "guest_name": self.name,
                "incoming": t.incoming if t else None,
                "suspend_requested": t.suspend_requested if t else False,
                "events": list(self.events)}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        domid = self.agent.guest_domid
        if self.name is None:
            raw = self.xs.read(f"/local/domain/{domid}/name")
            if not raw:
                raise XenError(0, f"dom{domid} has no name in xenstore: cannot follow xl")
            self.name = raw.decode("utf-8", "replace")
        self.tracker = XlMigrationTracker(self.name, domid)
        self._loop = asyncio.get_running_loop()
        self._watch(f"/local/domain/{domid}/control/shutdown", f"shutdown:{domid}")
        # The initial firing of these is a useful first look (an agent started while a
        # migration is under way); that of control/shutdown is not an observation.
        self._watch("@introduceDomain", "intro", skip_initial=False)
        self._watch("@releaseDomain", "release", skip_initial=False)
        self._loop.add_reader(self.xs.watch_fileno(), self._on_watch)
        LOG.info("xl follower: following xl migrate of %r (dom%d)", self.name, domid)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.xs.watch_fileno())
        if self._task is not None:
            self._task.cancel()
        for path, token in self._watches:
            try:
                self.xs.unwatch(path, token)
            except (XenError, OSError) as exc:
                LOG.debug("xl follower: unwatch %s: %s", path, exc)
        self._watches.clear()

    def _watch(self, path: str, token: str, *, skip_initial: bool = True) -> None:
        self.xs.watch(path, token)
        self._watches.append((path, token))
        if skip_initial:  # xenstored fires every new watch once: not an observation
            self._fresh.add(token)

    def _unwatch(self, token: str) -> None:
        for path, tok in [w for w in self._watches if w[1] == token]:
            self._watches.remove((path, tok))
            try:
                self.xs.unwatch(path, tok)
            except (XenError, OSError) as exc:
                LOG.debug("xl follower: unwatch %s: %s", path, exc)
        self._fresh.discard(token)

    # -- observations ------------------------------------------------------------------------
    def _on_watch(self) -> None:
        try:
            events = self.xs.read_watch_events()
        except (XenError, OSError) as exc:
            LOG.error("xl follower: xenstore watch failed, no longer following: %s", exc)
            assert self._loop is not None
            self._loop.remove_reader(self.xs.watch_fileno())
            return
        for path, token in events:
            if token in self._fresh:
                self._fresh.discard(token)
                continue
            try:
                self._observe(path, token)
            except (XenError, OSError) as exc:
                LOG.warning("xl follower: %s %s: %s", token, path, exc)

    def _observe(self, path: str, token: str) -> None:
        t = self.tracker
        assert t is not None
        kind, _, arg = token.partition(":")
        if kind == "shutdown":
            actions = t.on_shutdown(int(arg), self.xs.read(path))
            if actions and t.incoming is None:  # its name may have come after @introduceDomain
                actions += t.on_domains(self._domain_names())
        elif kind == "intro":
            actions = t.on_domains(self._domain_names())
        elif kind == "name":
            actions = t.on_name(int(arg), self.xs.read(path))
        elif kind == "release":
            live = {int(d) for d in self.xs.directory("/local/domain") if d.isdigit()}
            actions = t.on_released(live)
        elif kind == "oldbe":
            actions = t.on_old_backend(arg, self.xs.read(f"{arg}/online"),
                                       self.xs.read(f"{arg}/state"))
        else:
            actions = []
        for action in actions:
            self._act(action)

    def _domain_names(self) -> dict[int, bytes | None]:
        return {int(d): self.xs.read(f"/local/domain/{d}/name")
                for d in self.xs.directory("/local/domain") if d.isdigit()}

    def _act(self, action: Action) -> None:
        a = self.agent
        if isinstance(action, Freeze):
            a.freeze()
            self.note("suspend-requested", domid=action.domid, value=action.value)
        elif isinstance(action, PlugIncoming):
            vfb_mod.plug(self.xs, a.xen.domid, action.domid, a.devid)
            # the initial firing counts: xl may have renamed it already
            self._watch(f"/local/domain/{action.domid}/name", f"name:{action.domid}",
                        skip_initial=False)
            self.note("incoming-domain", domid=action.domid, vfb_plugged=True)
        elif isinstance(action, Rehome):
            assert self._loop is not None
            self._task = self._loop.create_task(self._rehome(action.old, action.new))
        elif isinstance(action, AnswerClosed):
            self.xs.write(f"{action.path}/state", CLOSED.decode())
            self.note("old-backend-closed", path=action.path)
            self._unwatch(f"oldbe:{action.path}")
            self._old_backends.discard(action.path)
        elif isinstance(action, ThawAtSource):
            self.note("incoming-domain-gone", domid=action.domid)
            if a.frozen:
                a.thaw()
                self.note("thawed-at-source")

    async def _rehome(self, old: int, new: int) -> None:
        a, t = self.agent, self.tracker
        assert t is not None
        t0 = time.monotonic()
        self.note("guest-started", old=old, new=new)
        old_be = [f"/local/domain/{a.xen.domid}/backend/{d.be_kind}/{old}/{a.devid}"
                  for d in a.devices if d.kind != "vfb"]  # the agent removes the vfb it plugged
        if not a.frozen:
            a.freeze()
        try:
            a.rehome(a.xen, new)  # same host, same Xen: nothing to close
            self._unwatch(f"shutdown:{old}")
            self._unwatch(f"name:{new}")
            for p in old_be:
                # the initial firing counts: libxl may have written online=0 already
                self._watch(p, f"oldbe:{p}", skip_initial=False)
                self._old_backends.add(p)
            self._watch(f"/local/domain/{new}/control/shutdown", f"shutdown:{new}")
            t.rehomed(new)
            ok = await a.wait_until(a.devices_connected, self.connect_timeout)
            self.note("devices-connected" if ok else "devices-not-connected",
                      seconds=round(time.monotonic() - t0, 3))
            replayed = a.thaw()
            viewers = a.refresh()
            self.migrations += 1
            self.note("thawed", replayed=replayed, viewers=viewers,
                      seconds=round(time.monotonic() - t0, 3))
        except (XenError, OSError) as exc:
            LOG.error("xl follower: re-home dom%d -> dom%d failed: %s", old, new, exc)
            self.note("rehome-failed", old=old, new=new, error=str(exc))
        finally:
            self._task = None
