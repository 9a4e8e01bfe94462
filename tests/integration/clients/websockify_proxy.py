"""websockify 0.13 (from PyPI, in the venv) in front of a TCP RFB server, for noVNC.

Run as a child process (``python -m websockify``), not in-process: websockify forks a handler
per connection and installs signal handlers, neither of which belongs inside pytest.  It binds a
port we pick (free a moment before) and we wait until it accepts connections.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import ClientError, free_tcp_port, stop_process, wait_for_port

#: websockify is up in 0.2-0.4 s here; more than this means it is broken.
START_TIMEOUT = 15.0
#: How many times to retry when another process grabbed the port we picked.
PORT_ATTEMPTS = 3


class Websockify:
    """``ws://127.0.0.1:<port>/`` -> ``target_host:target_port`` (plain TCP)."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 web_dir: str | Path | None = None) -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self._dir = Path(tempfile.mkdtemp(prefix="dmore-websockify-"))
        self.log_path = self._dir / "websockify.log"
        self.proc: subprocess.Popen | None = None
        last_error = ""
        for _ in range(PORT_ATTEMPTS):
            self.port = free_tcp_port(listen_host)
            args = [sys.executable, "-m", "websockify", "--log-file", str(self.log_path)]
            if web_dir is not None:
                args += ["--web", str(web_dir)]
            args += [f"{listen_host}:{self.port}", f"{target_host}:{target_port}"]
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            try:
                wait_for_port(listen_host, self.port, START_TIMEOUT,
                              alive=lambda: self.proc.poll() is None)
                return
            except ClientError as e:
                last_error = f"{e}; log: {self.log()[-500:]}"
                stop_process(self.proc)
        self.close()
        raise ClientError(f"websockify did not start: {last_error}")

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Websockify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
