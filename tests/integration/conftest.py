"""Fixtures shared by the integration tests: our RFB server on a background loop."""

from __future__ import annotations

import pytest

from tests.integration.clients.fixtures import *  # noqa: F403 (real-client fixtures)
from tests.integration.rfb_harness import DemoServerHandle
from tests.integration.simhosts import sim_supervisor


@pytest.fixture
def demo_server_factory():
    handles: list[DemoServerHandle] = []

    def make(**kw) -> DemoServerHandle:
        h = DemoServerHandle(**kw)
        handles.append(h)
        return h

    yield make
    for h in handles:
        h.stop()


@pytest.fixture
def demo_server(demo_server_factory) -> DemoServerHandle:
    return demo_server_factory()


@pytest.fixture
def sim_sup():
    """A private sim supervisor; every host it starts is stopped and its files removed."""
    with sim_supervisor() as sup:
        yield sup
