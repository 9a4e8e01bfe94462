"""A userspace Xen host with Xen's semantics, for tests, the demo and laptops.

* :mod:`.host` -- the hypervisor process: domains, memory, grant tables, event channels and
  the xenstored (:mod:`.xenstored` over :mod:`.xenstore`) on one asyncio loop;
* :mod:`.hypercall` -- the sans-IO codec of the host <-> domain protocol;
* :mod:`.memory`, :mod:`.evtchn` -- the grant-table and event-channel state machines;
* :mod:`.client` -- :class:`SimXen` (``api.Xen`` for a process acting as a domain: backends)
  and :class:`SimToolstack` (dom0's ``xl``);
* :mod:`.kernel` -- :class:`SimKernel`, what a guest kernel gives its PV frontends;
* :mod:`.supervisor` -- several hosts side by side, and the ``dmore-sim`` CLI.

The names below are imported lazily, so that ``python -m dmore_nova.xen.sim.host`` does not
import the host module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"SimXen": "client", "SimToolstack": "client", "SimEventChannels": "client",
            "SimKernel": "kernel", "Supervisor": "supervisor", "HostHandle": "supervisor"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
