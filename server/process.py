"""Run ``kvstore serve`` as a child process: for benchmarks, examples and tests.

    with DaemonProcess(["--dram-bytes", "1GiB"]) as daemon:
        async with KVClient(daemon.target) as kv: ...

The child listens on a free loopback port (``--port 0``) and reports the bound ports through
``--ready-file``; leaving the block sends SIGTERM and waits for a graceful exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from kvstore.errors import UnavailableError


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now, for daemons that must know each other's ports
    before they start (peers list each other). Another process may take one meanwhile: rare."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class DaemonProcess:
    def __init__(self, args: Sequence[str] = (), *, start_timeout_s: float = 30.0) -> None:
        self.args = list(args)
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.metrics_port = 0
        self._dir = tempfile.TemporaryDirectory(prefix="kvstore-daemon-")
        self.log_path = Path(self._dir.name) / "daemon.log"
        self._final_log: str | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        ready = Path(self._dir.name) / "ready.json"
        # No NVMe tier and no metrics unless asked for: a child daemon leaves nothing behind.
        defaults = {"--host": "127.0.0.1", "--port": "0", "--metrics-port": "0", "--nvme-dir": "off"}
        given = {arg.partition("=")[0] for arg in self.args}
        cmd = [
            sys.executable, "-m", "kvstore.server.cli", "serve",
            *(part for flag, value in defaults.items() if flag not in given for part in (flag, value)),
            *self.args, "--ready-file", str(ready),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + self.start_timeout_s
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UnavailableError(f"kvstore serve did not start:\n{self.log()}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]

    def log(self) -> str:
        """What the daemon printed (kept after it stopped)."""
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Signal the daemon and wait for it; kills it if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self._final_log = self.log()
        self._dir.cleanup()
        return code
