"""Sim hosts for tests: a private supervisor (short /tmp run dir, unix socket paths are limited to
107 bytes; private /dev/shm dir) that stops every host it started and removes its files."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from dmore_nova.xen.api import XenError
from dmore_nova.xen.sim.supervisor import Supervisor


class TestSupervisor(Supervisor):
    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str = "dsim") -> None:
        self.tmp_base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.tmp_shm = f"/dev/shm/{prefix}-{os.getpid()}-{os.path.basename(self.tmp_base)}"
        super().__init__(self.tmp_base, self.tmp_shm)

    def cleanup(self) -> None:
        for h in self.list_hosts():
            with contextlib.suppress(XenError):
                self.stop_host(h.name)
        shutil.rmtree(self.tmp_base, ignore_errors=True)
        shutil.rmtree(self.tmp_shm, ignore_errors=True)


@contextlib.contextmanager
def sim_supervisor(prefix: str = "dsim") -> Iterator[TestSupervisor]:
    sup = TestSupervisor(prefix)
    try:
        yield sup
    finally:
        sup.cleanup()
