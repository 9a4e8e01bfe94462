"""``dmore-nova demo`` as a user runs it: a subprocess, its page in headless Chromium, the CLI
from "another terminal", Ctrl-C (SIGINT).

* The page loads, its noVNC connects through the console proxy, keys typed on it reach the
  guest; the Migrate button moves the guest and its RM VM; the status panel follows, and
  agrees with ``dmore-nova status --json``; ``dmore-nova migrate`` from the CLI shows on the page
  too; the page's console never disconnects.
* SIGINT stops everything: the demo exits 0 and no process it started (sim hosts, the guest
  program and its shell, the console proxy) is left, no memory file, no socket; the ports are
  free again.
* A demo killed with SIGKILL leaves its processes behind: the next start stops them and starts
  cleanly on the same ports; a second demo on a running one's run dir is refused.
* The control API refuses what it must (bad Host, cross-origin or non-JSON POSTs, paths
  outside noVNC, unknown guests/hosts/steps) with clear errors, and the CLI exits accordingly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dmore_nova.demo.runtime import process_starttime, read_state
from tests.integration.clients import JS_ROOT, stop_process
from tests.integration.demo_harness import REPO, DemoProcess, expected_events, wait_for

#: A small playwright-core driver for the demo page: loads it, then answers JSON-line commands
#: on stdin ({"cmd": "state" | "click" | "text" | "type" | "quit", ...}) with JSON lines.
PAGE_DRIVER = r"""
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';
const [jsRoot, url] = process.argv.slice(2);
const require = createRequire(path.join(jsRoot, 'package.json'));
const { chromium } = require('playwright-core');
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run',
         '--disable-background-networking', '--disable-background-timer-throttling',
         '--disable-renderer-backgrounding'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
const log = [];
page.on('console', (m) => log.push(m.type() + ': ' + m.text()));
page.on('pageerror', (e) => log.push('pageerror: ' + e.message));
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
await page.goto(url);
await page.waitForFunction(() => window.demoPage !== undefined, null, { timeout: 20000 });
out({ ready: true });
for await (const line of readline.createInterface({ input: process.stdin })) {
  const msg = JSON.parse(line);
  try {
    let result = null;
    if (msg.cmd === 'quit') break;
    if (msg.cmd === 'state') result = await page.evaluate(() => window.demoPage.state());
    else if (msg.cmd === 'click') await page.click(msg.selector);
    else if (msg.cmd === 'text') result = await page.$eval(msg.selector, (e) => e.textContent);
    else if (msg.cmd === 'type') {
      if (!await page.evaluate(() => window.demoPage.focus())) throw new Error('no focus');
      await page.keyboard.type(msg.text);
    } else throw new Error('unknown command ' + msg.cmd);
    out({ ok: true, result, log: log.slice(-20) });
  } catch (e) {
    out({ ok: false, error: String(e), log: log.slice(-20) });
  }
}
await browser.close();
"""


class DemoPage:
    """The demo page in headless Chromium."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        script = tmp_path / "demo_page.mjs"
        script.write_text(PAGE_DRIVER)
        self.proc = subprocess.Popen(["node", str(script), str(JS_ROOT), url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        first = self._line()
        assert first.get("ready"), first

    def _line(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"page driver ended: {err[-2000:]}")
        return json.loads(line)

    def ask(self, cmd: str, **args) -> object:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        reply = self._line()
        assert reply["ok"], reply
        return reply["result"]

    def state(self) -> dict:
        return self.ask("state")

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_process(self.proc)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def alive(pid: int) -> bool:
    return process_starttime(pid) is not None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def started_pids(demo: DemoProcess) -> dict[str, int]:
    """Every process the demo started, by role (the guest's shell included)."""
    st = demo.status()
    g = st["guests"][0]
    with demo.guest_control() as ctl:
        shell = ctl.status()["console"]["pid"]
    pids = {f"host {h['name']}": h["pid"] for h in st["hosts"]}
    pids.update({"guest program": g["pid"], "guest shell": shell,
                 "console proxy": st["proxy"]["pid"], "demo": st["demo"]["pid"]})
    return pids


def assert_all_gone(demo: DemoProcess, pids: dict[str, int], ports: list[int]) -> None:
    wait_for(lambda: not any(alive(p) for p in pids.values()), 10,
             f"every process gone: {[r for r, p in pids.items() if alive(p)]}")
    assert not demo.shm_dir.exists(), list(demo.shm_dir.rglob("*"))
    left = sorted(p.name for p in demo.run_dir.iterdir())
    assert left == ["logs"], left
    assert not list(demo.run_dir.rglob("*.sock"))
    for port in ports:
        assert port_free(port), f"port {port} still taken"


def number_after(label: str, text: str) -> float:
    m = re.search(re.escape(label) + r"\s*([0-9.]+) ms", text)
    assert m, f"{label!r} not in {text!r}"
    return float(m.group(1))


@pytest.mark.browser
def test_page_migrate_button_cli_and_ctrl_c(tmp_path):
    demo = DemoProcess()
    page = None
    try:
        st = demo.status()
        g = st["guests"][0]
        assert [h["name"] for h in st["hosts"]] == ["a", "b"]
        assert g["host"] == "a" and g["rm"]["kind"] == "vm" and g["rm"]["host"] == "a"
        assert st["demo"]["page_url"] == demo.url
        assert st["proxy"]["url"] == f"http://127.0.0.1:{demo.proxy_port}/"
        domains_a = {d["domid"]: d for d in st["hosts"][0]["domains"]}
        # The RM VM is a domain of its own with privilege over the guest.
        assert domains_a[g["rm"]["domid"]]["target"] == g["domid"]

        page = DemoPage(demo.url, tmp_path)
        wait_for(lambda: page.state()["rfbState"] == "connected"
                 and page.state()["updates"] >= 1, 20, "noVNC connected on the page")
        s = page.state()
        assert s["hostOf"] == {"guest": "a", "rm": "a"}, s
        assert s["button"] == {"text": "Migrate guest to b", "disabled": False}

        # Keys typed on the page reach the guest (through the proxy and the RM agent).
        with demo.guest_control() as ctl:
            wait_for(lambda: any("$" in x for x in (ctl.screen() or [])), 15, "prompt")
            start = len(ctl.keys())
            page.ask("type", text="echo hi\n")
            wait_for(lambda: ctl.keys()[start:] == expected_events("echo hi\n"), 10,
                     "keys from the page at the guest")

        # The Migrate button moves guest and RM VM to b; the panel follows.
        page.ask("click", selector="#migrate")
        wait_for(lambda: page.state()["lastShown"] == 1, 30, "the migration's result")
        s = page.state()
        assert s["hostOf"] == {"guest": "b", "rm": "b"}, s
        assert s["migrateError"] is None and s["lastRecord"]["ok"], s
        cli = demo.cli("status", "--json")
        assert cli.returncode == 0, cli.stderr
        st = json.loads(cli.stdout)
        g = st["guests"][0]
        assert g["host"] == "b" and g["rm"]["host"] == "b"
        last = g["last_migration"]
        assert last["id"] == 1 and last["ok"] and (last["from"], last["to"]) == ("a", "b")
        assert last == s["lastRecord"]
        hosts_text = page.ask("text", selector="#hosts")
        assert f"dom{g['domid']}" in hosts_text and f"RM VM · dom{g['rm']['domid']}" in hosts_text
        last_text = page.ask("text", selector="#last")
        assert abs(number_after("guest downtime", last_text) - last["guest_downtime_ms"]) < 0.06
        assert f"{last['keys_held']} / {last['keys_lost']}" in last_text
        assert last["keys_lost"] == 0 and last["disconnects"] == 0
        assert last["viewers_kept"] == last["viewers_before"] == 1  # the page's console
        assert page.state()["button"]["text"] == "Migrate guest to a"

        # From "another terminal": the CLI moves it back; the page shows it within a poll.
        r = demo.cli("migrate", "guest", "a")
        assert r.returncode == 0, r.stderr
        assert "guest: b -> a: done" in r.stdout and "guest runs on a" in r.stdout
        wait_for(lambda: page.state()["hostOf"] == {"guest": "a", "rm": "a"}, 5,
                 "the page to show the CLI's migration")
        human = demo.cli("status")
        assert human.returncode == 0 and "guest   guest: dom" in human.stdout
        assert "on a; RM VM dom" in human.stdout and st["proxy"]["url"] in human.stdout

        s = page.state()
        assert s["rfbState"] == "connected" and s["disconnects"] == 0 and s["connects"] == 1, s

        # Ctrl-C: everything stops, nothing is left.
        pids = started_pids(demo)
        assert all(alive(p) for p in pids.values()), pids
        rfb_port = demo.guest()["rm"]["rfb"]["port"]
        assert demo.interrupt() == 0, demo.output()
        assert "stopped (nothing left running)" in demo.output()
        assert_all_gone(demo, pids, [demo.port, demo.proxy_port, rfb_port])
        wait_for(lambda: page.state()["rfbState"] == "disconnected", 10,
                 "the page to see the console go")
        assert (demo.run_dir / "logs" / "demo.log").is_file()
    finally:
        if page is not None:
            page.close()
        demo.close()


def test_restart_after_a_crash_and_refusal_of_a_second_demo():
    demo = DemoProcess(extra=["--guest-memory", "16M", "--rm", "dom0"])
    try:
        g = demo.guest()
        assert g["rm"]["kind"] == "dom0" and g["rm"]["domid"] == 0
        # A second demo on the same run dir is refused while the first runs.
        second = subprocess.run(
            [sys.executable, "-m", "dmore_nova.cmd.dmore_nova", "demo", "--run-dir",
             str(demo.run_dir), "--shm-dir", str(demo.shm_dir), "--port", "0",
             "--proxy-port", "0"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert second.returncode == 1 and "a demo already runs" in second.stderr, second.stderr
        # ... and leaves the running one alone (its state, sockets and memory files).
        assert (demo.run_dir / "demo.json").is_file() and demo.shm_dir.is_dir()
        assert demo.migrate("b")["ok"]

        # SIGKILL: the orchestrator cannot clean up; its children run on.
        old = started_pids(demo)
        demo.proc.send_signal(signal.SIGKILL)
        demo.proc.wait(10)
        leftovers = {r: p for r, p in old.items() if r != "demo"}
        assert all(alive(p) for p in leftovers.values()), leftovers
        # The next start stops them and comes up on the same ports and run dir.
        demo.start()
        assert not any(alive(p) for p in leftovers.values())
        new = started_pids(demo)
        assert not set(new.values()) & set(old.values())
        rec = demo.migrate("b")
        assert rec["ok"] and rec["rm_host"] == "b" and rec["rm_domid"] is None
        rfb_port = demo.guest()["rm"]["rfb"]["port"]
        assert demo.interrupt() == 0, demo.output()
        assert_all_gone(demo, new, [demo.port, demo.proxy_port, rfb_port])
    finally:
        demo.close()


def test_control_api_and_cli_refusals(tmp_path):
    demo = DemoProcess(extra=["--guest-memory", "16M"])
    try:
        def call(path: str, body: bytes | None = None, headers: dict | None = None,
                 method: str | None = None) -> tuple[int, dict | bytes]:
            req = urllib.request.Request(demo.url + path, data=body, headers=headers or {},
                                         method=method)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    code, raw = r.status, r.read()
            except urllib.error.HTTPError as exc:
                code, raw = exc.code, exc.read()
            try:
                return code, json.loads(raw)
            except ValueError:
                return code, raw

        js = {"Content-Type": "application/json"}
        ok = json.dumps({"guest": "guest", "host": "b"}).encode()
        assert call("api/status", headers={"Host": "evil.example:80"})[0] == 403
        assert call("api/migrate", ok, {**js, "Origin": "http://evil.example"})[0] == 403
        assert call("api/migrate", ok, {"Content-Type": "text/plain"})[0] == 415
        assert call("api/migrate", b"{" * 5000, js)[0] == 400
        assert call("api/migrate", b"[1]", js) == (400, {"error": "the body must be a JSON "
                                                                  "object"})
        code, doc = call("api/migrate", json.dumps({"guest": "guest", "host": "b",
                                                    "fail_at": "nowhere"}).encode(), js)
        assert code == 400 and "bad failure point 'nowhere'" in doc["error"]
        code, doc = call("api/migrate", json.dumps({"guest": "nope", "host": "b"}).encode(), js)
        assert code == 404 and "no guest 'nope'" in doc["error"]
        code, doc = call("api/migrate", json.dumps({"guest": "guest", "host": "a"}).encode(), js)
        assert code == 409 and "already runs on a" in doc["error"]
        for path in ("novnc/../../../../etc/passwd", "novnc/core/", "nothing", "api/nothing"):
            assert call(path)[0] == 404, path
        code, body = call("novnc/core/rfb.js")
        assert code == 200 and b"export default class RFB" in body
        code, body = call("")
        assert code == 200 and b"window.demoPage" in body
        # Nothing moved; a same-origin POST (what the page sends) is accepted.
        code, rec = call("api/migrate", ok, {**js, "Origin": demo.url.rstrip("/")})
        assert code == 200 and rec["ok"] and rec["to"] == "b", rec

        r = demo.cli("migrate", "guest", "mars")
        assert r.returncode == 2 and "no host 'mars'" in r.stderr
        r = demo.cli("migrate", "guest", "a", "--fail-at", "guest-switchover")
        assert r.returncode == 1 and "rolled-back" in r.stdout and "guest runs on b" in r.stdout
        assert demo.guest()["host"] == "b"
        r = demo.cli("migrate", "guest", "a", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["to"] == "a"
    finally:
        assert demo.interrupt() == 0
        demo.close()
    # No demo: the CLI says so.
    r = subprocess.run([sys.executable, "-m", "dmore_nova.cmd.dmore_nova", "status", "--url",
                        f"http://127.0.0.1:{demo.port}/api/"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "no demo answers" in r.stderr
    # A run dir that is too long for the sim's sockets is refused up front.
    deep = tmp_path / ("x" * 90)
    r = subprocess.run([sys.executable, "-m", "dmore_nova.cmd.dmore_nova", "demo", "--run-dir",
                        str(deep), "--port", "0", "--proxy-port", "0"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and "too long for a Unix socket" in r.stderr


def test_ctrl_c_during_start_up_leaves_nothing(tmp_path):
    """SIGINT while the hosts are coming up: start-up finishes its step, then everything
    stops (exit 130); no process or memory file is left."""
    run_dir = Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))
    shm_dir = Path(f"/dev/shm/dd-{os.getpid()}-{run_dir.name}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmore_nova.cmd.dmore_nova", "demo", "--run-dir", str(run_dir),
         "--shm-dir", str(shm_dir), "--port", "0", "--proxy-port", "0", "--rfb-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    pids: set[int] = set()
    try:
        def hosts_up() -> bool:
            doc = read_state(run_dir) or {}
            pids.update(int(h["pid"]) for h in (doc.get("hosts") or {}).values())
            return len(pids) >= 1
        wait_for(hosts_up, 30, "a sim host to be up")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode in (130, 0), out  # 0: it was ready by the time SIGINT came
        assert "stopping" in out
        doc = read_state(run_dir) or {}
        assert doc == {}, doc  # the state file went with everything else
        assert not any(alive(p) for p in pids), pids
        assert not shm_dir.exists()
        assert sorted(p.name for p in run_dir.iterdir()) == ["logs"]
    finally:
        stop_process(proc)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)
