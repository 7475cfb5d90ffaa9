"""A real S3-compatible server (moto's server mode) on a loopback port, for the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


class MotoServer:
    def __init__(self, port: int | None = None) -> None:
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto_server did not start (pip install 'moto[server]')")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def use_test_credentials() -> None:
    """moto accepts any credentials; the AWS chain needs some to sign requests."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "kvstore-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kvstore-test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
