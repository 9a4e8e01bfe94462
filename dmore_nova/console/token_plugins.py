"""Console token -> RM endpoint lookup, as websockify token plugins.

A console URL carries a token; the proxy asks a plugin where that token's RFB server is *now*.
It asks again on every re-attach, which is how an RM VM that moved is found: the orchestrator
updates the mapping (or the plugin computes it), the proxy's retry loop picks it up.

The seam for Nova
-----------------
:class:`TargetPlugin` is the interface the proxy uses.  Two methods matter:

``resolve(token)``
    Once per websocket, before the upgrade.  ``None`` refuses the connection.  A Nova plugin
    will do what ``NovaProxyRequestHandler`` does: ``ConsoleAuthToken.validate(ctxt, token)``
    and, from its ``connect_info``, the host and port ``get_vnc_console`` gave (the RM VM's
    endpoint); ``key`` = the instance UUID.

``reresolve(token, previous)``
    On every re-attach attempt.  The default asks ``resolve`` again.  A Nova plugin must not:
    Nova deletes an instance's console tokens in ``_post_live_migration``, exactly when a
    re-attach is needed; it will look the endpoint up by ``previous.key`` (the instance)
    instead - the token authenticated the user once, the session keeps that authorisation.

The plugins here subclass websockify's ``BasePlugin`` and keep its ``lookup(token) ->
(host, port)``, so they also work with plain websockify (``--token-plugin``).

Tokens come from browsers and are untrusted: :func:`valid_token` bounds their length and
alphabet before any plugin sees them.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from websockify.token_plugins import BasePlugin

LOG = logging.getLogger(__name__)

#: Longest token accepted (Nova's are UUIDs, 36 characters).
MAX_TOKEN_LEN = 256
#: Largest token file read; a bigger one is refused (and the previous mapping kept).
MAX_TOKEN_FILE = 16 << 20
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~:@+=-]+")


def valid_token(token: object) -> bool:
    """Printable URL-safe characters only, at most MAX_TOKEN_LEN of them."""
    return (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LEN
            and _TOKEN_RE.fullmatch(token) is not None)


@dataclass(frozen=True)
class ConsoleTarget:
    """Where one console's RFB server is, and how to get in."""

    host: str
    port: int
    #: VNC Authentication password of that server (None: it offers security type None).
    password: str | None = field(default=None, repr=False)
    #: Identity that survives a move (e.g. the instance UUID): re-attach signals may use it.
    key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or len(self.host) > 255:
            raise ValueError(f"bad host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port!r}")
        if self.password is not None and not isinstance(self.password, str):
            raise ValueError("password must be a string")
        if self.key is not None and (not isinstance(self.key, str) or len(self.key) > 255):
            raise ValueError(f"bad key {self.key!r}")

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.host, self.port


class TargetPlugin(BasePlugin):
    """The proxy's token interface (see the module docstring)."""

    def resolve(self, token: str) -> ConsoleTarget | None:
        raise NotImplementedError

    def reresolve(self, token: str, previous: ConsoleTarget) -> ConsoleTarget | None:
        return self.resolve(token)

    def lookup(self, token: str) -> list | None:
        """websockify's plugin API: ``[host, port]`` or None."""
        target = self.resolve(token) if valid_token(token) else None
        return None if target is None else [target.host, target.port]


class StaticTokens(TargetPlugin):
    """An in-process mapping, changed with :meth:`set`/:meth:`remove` (tests, the demo, or an
    orchestrator living in the proxy's process).  Thread-safe."""

    def __init__(self, src: Mapping[str, ConsoleTarget] | None = None) -> None:
        super().__init__(src)
        self._lock = threading.Lock()
        self._targets: dict[str, ConsoleTarget] = dict(src or {})

    def set(self, token: str, target: ConsoleTarget) -> None:
        if not valid_token(token):
            raise ValueError(f"invalid token {token!r}")
        with self._lock:
            self._targets[token] = target

    def remove(self, token: str) -> None:
        with self._lock:
            self._targets.pop(token, None)

    def resolve(self, token: str) -> ConsoleTarget | None:
        with self._lock:
            return self._targets.get(token)


class JSONTokenFile(TargetPlugin):
    """A JSON file ``{"<token>": {"host": ..., "port": ..., "password": ..., "key": ...}}``,
    re-read whenever it changes (checked with stat on every lookup, so a re-attach sees an
    update at once).

    Replace the file atomically (write elsewhere, rename over): a file that does not parse is
    refused as a whole and the previous mapping stays in force, so a half-written file never
    disconnects anyone.  Invalid single entries are skipped with a logged reason.
    """

    def __init__(self, src: str) -> None:
        super().__init__(src)
        if not src:
            raise ValueError("JSONTokenFile needs the path of the token file as its source")
        self.path = src
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._targets: dict[str, ConsoleTarget] = {}
        #: Why the last (re)load was refused, for operators and tests.
        self.last_error: str | None = None

    def resolve(self, token: str) -> ConsoleTarget | None:
        with self._lock:
            self._maybe_reload()
            return self._targets.get(token)

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._refuse(f"cannot stat {self.path}: {exc.strerror}")
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if st.st_size > MAX_TOKEN_FILE:
            self._refuse(f"{self.path} is {st.st_size} bytes (limit {MAX_TOKEN_FILE})")
            return
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_TOKEN_FILE + 1)
            doc = json.loads(raw)
        except (OSError, ValueError) as exc:
            self._refuse(f"cannot read {self.path}: {exc}")
            return
        if len(raw) > MAX_TOKEN_FILE or not isinstance(doc, dict):
            self._refuse(f"{self.path}: expected a JSON object of at most {MAX_TOKEN_FILE} "
                         "bytes")
            return
        targets: dict[str, ConsoleTarget] = {}
        for token, entry in doc.items():
            if not valid_token(token):
                LOG.warning("%s: skipping an invalid token (%d characters)", self.path,
                            len(token))
                continue
            try:
                if not isinstance(entry, dict):
                    raise ValueError("entry is not an object")
                unknown = set(entry) - {"host", "port", "password", "key"}
                if unknown:
                    raise ValueError(f"unknown fields {sorted(unknown)}")
                targets[token] = ConsoleTarget(entry.get("host"), entry.get("port"),
                                               entry.get("password"), entry.get("key"))
            except (TypeError, ValueError) as exc:
                LOG.warning("%s: skipping token %s...: %s", self.path, token[:8], exc)
        self._targets = targets
        self.last_error = None
        LOG.info("%s: %d console tokens loaded", self.path, len(targets))

    def _refuse(self, reason: str) -> None:
        if reason != self.last_error:
            LOG.error("token file refused, keeping the previous mapping: %s", reason)
        self.last_error = reason


def load_plugin(class_path: str, source: str | None) -> TargetPlugin:
    """Instantiate ``package.module.Class(source)``; it must be a :class:`TargetPlugin`."""
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"token plugin {class_path!r} is not a dotted class path")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load token plugin {class_path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, TargetPlugin)):
        raise ValueError(f"token plugin {class_path!r} is not a TargetPlugin (the proxy needs "
                         "resolve()/reresolve(), not only websockify's lookup())")
    return cls(source)
