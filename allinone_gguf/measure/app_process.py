"""Start the real app (`python app.py`) on a free loopback port: for the API benches and the API and browser tests.

    >>> from allinone_gguf.measure.app_process import running_app
    >>> with running_app(model_path, models_dir, "--api-key", "k") as server:   # doctest: +SKIP
    ...     print(server.url, server.output())
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..paths import ROOT

READY = "Qwen All-in-One is ready: "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def running_app(model: Path, models_dir: Path, *extra: str, timeout: float = 180.0):
    """Yield an AppServer once the app prints its URL; stop it (and only it) afterwards."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with tempfile.NamedTemporaryFile("w+b", prefix="app-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", str(model), "--models-dir", str(models_dir),
                                 "--host", "127.0.0.1", "--port", str(port), *extra],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}/", proc, Path(log.name))
    try:
        deadline = time.monotonic() + timeout
        while READY not in server.output():
            if not server.alive():
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{server.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py not ready after {timeout:.0f} s:\n{server.output()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.log.unlink(missing_ok=True)
