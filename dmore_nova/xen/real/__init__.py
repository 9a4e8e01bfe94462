"""Real Xen: pyxs for xenstore, ctypes over libxenevtchn/libxengnttab/libxenforeignmemory.

Importing this package (or any module in it) loads no Xen library and touches no device; see
:mod:`.libs`.  ``RealXen`` is re-exported lazily because :mod:`dmore_nova.xen.pyxs_store` imports
:mod:`.xenbus_conn` from here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RealXen"]


def __getattr__(name: str) -> Any:
    if name == "RealXen":
        from dmore_nova.xen.real.xen import RealXen

        return RealXen
    raise AttributeError(name)
