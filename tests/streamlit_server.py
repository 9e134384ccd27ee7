"""Run ``streamlit run app.py`` on a free loopback port for the real-browser tests."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll ``url`` every 0.1 s until it answers 200 (raises if the server exits or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def serve_app(env: dict[str, str], log_path: Path, command: list[str] | None = None,
              health_timeout: float = 60.0) -> Iterator[dict]:
    """Start the app with ``env`` added to the environment; yields its URL, start time and log path.

    ``command`` replaces ``streamlit run app.py`` (``{port}`` in it becomes the port), e.g. the
    ``covidscan app`` launcher; ``health_timeout`` bounds the wait for its health check.
    """
    port = free_port()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    environment.pop("COVIDSCAN_RAY_ADDRESS", None)
    with open(log_path, "wb") as log:
        started = time.monotonic()
        argv = ([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                 "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
                if command is None else [part.replace("{port}", str(port)) for part in command])
        process = subprocess.Popen(argv, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(f"{base}/_stcore/health", process, timeout=health_timeout)
            yield {"url": base, "started": started, "healthy": time.monotonic(), "log": log_path}
        finally:
            process.send_signal(signal.SIGINT)  # Streamlit's own clean shutdown (Ctrl+C)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def full_page_screenshot(page, name: str) -> Path:
    """Screenshot the whole page: Streamlit scrolls inside its main container, so grow the viewport to fit."""
    ARTIFACTS.mkdir(exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight ?? 0")
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(int(height), 5000))})
    page.wait_for_timeout(500)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    return path
