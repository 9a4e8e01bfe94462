"""Client of the guest program's control socket (``--control``): drive a sim guest process.

:class:`GuestControl` implements :class:`~dmore_nova.xen.sim.migration.MigratingGuest`, so the
toolstack can live-migrate a *process* running ``python -m dmore_nova.xen.sim.guest``::

    ctl = GuestControl(sock_path)
    LiveMigration(src_host, dst_host, domid, ctl).run()

Wire format: one JSON object per line each way.  Requests ``{"op": ...}``; replies
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.  Ops: ``status``, ``screen``,
``keys``, ``enable_dirty_log``, ``take_dirty_log`` (``frames``), ``suspend``, ``resume``
(optionally ``host_dir`` + ``domid``: continue as that domain of that host), ``resume_cancelled``,
``stop``.  The reply to ``suspend`` comes once the guest is quiescent.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from dmore_nova.xen.api import XenError

DEFAULT_TIMEOUT = 30.0
#: Longest reply accepted (a dirty log of a few hundred thousand frames fits).
MAX_REPLY = 16 << 20


class GuestControl:
    """A connection to one guest program's control socket (thread-safe, one request at a
    time).  Failures raise :class:`XenError`: the guest's refusal as EINVAL, a dead or
    silent guest as EPIPE / ETIMEDOUT."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as exc:
                s.close()
                raise XenError(exc.errno or errno.ECONNREFUSED,
                               f"no sim guest at {self.path}: {exc}") from exc
            self._sock, self._buf = s, b""
        return self._sock

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        with self._lock:
            sock = self._connect()
            try:
                sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                while b"\n" not in self._buf:
                    if len(self._buf) > MAX_REPLY:
                        raise XenError(errno.EMSGSIZE, f"{op}: reply over {MAX_REPLY} bytes")
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise XenError(errno.EPIPE, f"{op}: the guest closed its control socket")
                    self._buf += chunk
            except TimeoutError as exc:
                self.close_locked()
                raise XenError(errno.ETIMEDOUT, f"{op}: no answer from the guest") from exc
            except OSError as exc:
                self.close_locked()
                if isinstance(exc, XenError):
                    raise
                raise XenError(exc.errno or errno.EPIPE, f"{op}: {exc}") from exc
            line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise XenError(errno.EPROTO, f"{op}: bad reply from the guest") from exc
        if not isinstance(reply, dict) or not reply.get("ok"):
            err = reply.get("error") if isinstance(reply, dict) else None
            raise XenError(errno.EINVAL, f"{op}: {err or 'refused'}")
        return reply

    # -- MigratingGuest --------------------------------------------------------------------
    def enable_dirty_log(self) -> None:
        self.request("enable_dirty_log")

    def take_dirty_log(self) -> list[int]:
        frames = self.request("take_dirty_log").get("frames")
        if not isinstance(frames, list) or not all(isinstance(f, int) for f in frames):
            raise XenError(errno.EPROTO, "take_dirty_log: frames is not a list of integers")
        return frames

    def suspend(self) -> None:
        self.request("suspend")

    def resume(self, run_dir: Path | str | None = None, domid: int | None = None) -> None:
        args: dict[str, Any] = {}
        if run_dir is not None or domid is not None:
            args = {"host_dir": str(run_dir), "domid": domid}
        self.request("resume", **args)

    def resume_cancelled(self) -> None:
        self.request("resume_cancelled")

    # -- probes ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.request("status")

    def screen(self) -> list[str] | None:
        return self.request("screen").get("lines")

    def keys(self) -> list[tuple[int, bool]]:
        return [(int(c), bool(p)) for c, p in self.request("keys").get("keys", [])]

    def stop(self) -> None:
        self.request("stop")

    def close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def close(self) -> None:
        with self._lock:
            self.close_locked()

    def __enter__(self) -> GuestControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
