"""Client of a running demo's control API (``dmore-nova migrate`` / ``dmore-nova status``).

The API's address comes from ``--url``, else from the state file of the run dir (``--run-dir``,
default ``/tmp/dmore-demo-<uid>``), else the default ``http://127.0.0.1:6080/api/``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dmore_nova.demo import runtime
from dmore_nova.demo.runtime import DemoError

DEFAULT_API_URL = "http://127.0.0.1:6080/api/"
#: Largest reply read (a status of a few guests and 10 migrations is a few KiB).
MAX_REPLY = 4 << 20
#: Seconds: a status answers at once; a migration takes a second or so (a 1 GiB guest longer).
STATUS_TIMEOUT = 15.0
MIGRATE_TIMEOUT = 180.0


class APIError(DemoError):
    """The demo answered with an error (``status`` is the HTTP code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def api_url(url: str | None = None, run_dir: str | Path | None = None) -> str:
    if url:
        return url if url.endswith("/") else url + "/"
    doc = runtime.read_state(Path(run_dir) if run_dir else runtime.DEFAULT_RUN_DIR)
    if doc and isinstance(doc.get("api_url"), str):
        return doc["api_url"]
    return DEFAULT_API_URL


class DemoClient:
    def __init__(self, url: str) -> None:
        self.url = url

    def _request(self, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     method="GET" if data is None else "POST")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read(MAX_REPLY + 1)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read(MAX_REPLY)).get("error") or exc.reason
            except (ValueError, AttributeError, OSError):
                message = str(exc.reason)
            raise APIError(exc.code, str(message)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DemoError(f"no demo answers at {self.url} ({reason}); start one with "
                            "'dmore-nova demo'") from None
        if len(raw) > MAX_REPLY:
            raise DemoError(f"reply from {self.url}{path} is larger than {MAX_REPLY} bytes")
        try:
            return json.loads(raw)
        except ValueError:
            raise DemoError(f"{self.url}{path} did not answer JSON") from None

    def status(self) -> dict[str, Any]:
        return self._request("status", None, STATUS_TIMEOUT)

    def migrate(self, guest: str, host: str, *, fail_at: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"guest": guest, "host": host}
        if fail_at:
            body["fail_at"] = fail_at
        return self._request("migrate", body, MIGRATE_TIMEOUT)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def format_migration(m: dict[str, Any]) -> str:
    where = m["to"] if m["ok"] or m.get("agent_restarted") else m["from"]
    text = (f"{m['guest']}: {m['from']} -> {m['to']}: {m['outcome']} in {_ms(m['total_ms'])} "
            f"(guest downtime {_ms(m['guest_downtime_ms'])}, console blackout "
            f"{_ms(m['console_blackout_ms'])}, re-map+re-bind {_ms(m['remap_rebind_ms'])}, "
            f"keys held {m['keys_held']}, lost {m['keys_lost']}, viewers kept "
            f"{m['viewers_kept']}/{m['viewers_before']}); {m['guest']} runs on {where}")
    if m.get("error"):
        text += f"\n  error: {m['error']}"
    for w in m.get("warnings") or ():
        text += f"\n  warning: {w}"
    return text


def format_status(st: dict[str, Any]) -> str:
    d = st["demo"]
    lines = [f"demo    pid {d['pid']}, page {d['page_url']} (run dir {d['run_dir']})",
             f"proxy   {st['proxy']['url']} (pid {st['proxy']['pid']}"
             f"{'' if st['proxy']['running'] else ', NOT RUNNING'})"]
    for i, h in enumerate(st["hosts"]):
        doms = ", ".join(f"{x['name']} (dom{x['domid']})" if "domid" in x else x.get("error", "?")
                         for x in h["domains"])
        lines.append(f"{'hosts' if i == 0 else '':8}{h['name']} (pid {h['pid']}): {doms}")
    for g in st["guests"]:
        rm = g["rm"]
        where = (f"RM VM dom{rm['domid']} on {rm['host']}" if rm["kind"] == "vm"
                 else f"RM agent in dom0 of {rm['host']}")
        state = "" if g["running"] else " (guest program NOT RUNNING)"
        if rm.get("failed"):
            state += f" (RM agent failed: {rm['failed']})"
        lines += [f"guest   {g['name']}: dom{g['domid']} on {g['host']}; {where}; RFB "
                  f"{rm['rfb']['host']}:{rm['rfb']['port']}; {len(rm['viewers'])} viewer(s)"
                  f"{state}",
                  f"        console {d['page_url']} · proxy page {g['console']['proxy_page']}",
                  f"        keys typed {g['keys']['typed']}, received by the guest "
                  f"{g['keys']['at_guest']}, in flight {g['keys']['in_flight']}"]
        if g["last_migration"]:
            lines.append("last    " + format_migration(g["last_migration"]).replace(
                "\n", "\n        "))
    return "\n".join(lines)
