"""The real-Xen tier: Xen 4.17 + Debian dom0 + a busybox PV guest inside QEMU (TCG).

Opt-in: ``DMORE_XENBOX=1``.  Without it every test that needs the box is skipped with that
reason; with it the box is built (cached stages, tools/xenbox/) and booted once per session,
and a box that cannot be built or booted fails the tests loudly (with the serial log's tail).

Tests that do not need the box (the sim half of the conformance suite) run either way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.integration.clients.fixtures import (  # noqa: F401 (fixtures)
    novnc_browser,
    novnc_connect,
    vncdotool_connect,
    vncdotool_reactor,
)

REPO = Path(__file__).resolve().parents[2]
SWITCH = "DMORE_XENBOX"
SKIP_REASON = (f"real-Xen tier is opt-in: set {SWITCH}=1 to build and boot Xen 4.17 in QEMU/TCG "
               "(tools/xenbox/README.md)")

#: Wall-clock of the tier's phases, printed at the end of the run (the lead decides from it
#: whether the tier fits CI).
TIMINGS: dict[str, float] = {}


def load_xenbox() -> ModuleType:
    """tools/xenbox/xenbox.py (not a package: it is also a stand-alone script)."""
    name = "dmore_xenbox_tool"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "xenbox" / "xenbox.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def opted_in() -> bool:
    return os.environ.get(SWITCH) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here and (
                "xenbox" in getattr(item, "fixturenames", ()) or "[xen]" in item.nodeid):
            item.add_marker(pytest.mark.xen)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if TIMINGS:
        terminalreporter.section("xenbox timings")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{k:40s} {v:8.1f} s")


@pytest.fixture(scope="session")
def xenbox() -> Iterator[object]:
    """The running box (``tools/xenbox/xenbox.py`` ``XenBox``), dom0's 5900 forwarded to a free
    host port (``box.ports[5900]``)."""
    if not opted_in():
        pytest.skip(reason=SKIP_REASON)
    xb = load_xenbox()
    t0 = time.monotonic()
    try:
        art = xb.build()
    except Exception as exc:  # noqa: BLE001 - any build failure fails the tier loudly
        pytest.fail(f"xenbox build failed: {exc}", pytrace=False)
    TIMINGS["build (cached stages reused)" if not any(
        v is not None for v in art.timings.values()) else "build"] = time.monotonic() - t0
    for k, v in art.timings.items():
        if v is not None:
            TIMINGS[f"  stage {k}"] = v
    box = xb.XenBox(art, forwards=(5900,))
    t1 = time.monotonic()
    try:
        box.start()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"xenbox did not boot: {exc}", pytrace=False)
    TIMINGS["boot to dom0 shell + setup"] = time.monotonic() - t1
    try:
        yield box
    finally:
        t2 = time.monotonic()
        box.stop()
        TIMINGS["power off"] = time.monotonic() - t2
        TIMINGS["xenbox session total"] = time.monotonic() - t0
