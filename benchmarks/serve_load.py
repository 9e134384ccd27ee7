"""A bounded load on the REST API over loopback: throughput, p50/p99 latency, errors, server memory.

Starts the server itself on 127.0.0.1 (a free port), waits for /healthz, sends ``--clients``
concurrent clients x ``--requests`` POST /v1/predict each (one PNG per request), then stops it.
Backends: ``uvicorn`` (``covidscan serve``) and ``ray`` (a local Ray head this script starts and
stops, and ``covidscan serve --ray-address`` with ``--replicas`` replicas). Memory is the RSS of the
server's whole process tree (for Ray: the head's tree, replicas included), before and after.

    python benchmarks/serve_load.py --backend uvicorn [--clients 8] [--requests 25] [--model NAME_OR_PATH]
    python benchmarks/serve_load.py --backend ray --replicas 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from streamlit_server import wait_healthy  # noqa: E402
from synthetic import encode, gradient_image  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_ray_head(env: dict, cpus: int) -> tuple[subprocess.Popen, str, str]:
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    gcs_port = free_port()
    head = subprocess.Popen([shutil.which("ray") or "ray", "start", "--head", "--block", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--include-dashboard=false",
                             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                             f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    address = f"127.0.0.1:{gcs_port}"
    deadline = time.monotonic() + 120
    while subprocess.run([shutil.which("ray") or "ray", "status", f"--address={address}"], capture_output=True,
                         env=env).returncode != 0:
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the Ray head did not start")
        time.sleep(1)
    return head, address, temp_dir


def run_load(url: str, png: bytes, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as session:
            for _ in range(requests):
                start = time.perf_counter()
                try:
                    ok = session.post(url, files=[("files", ("load.png", png))]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors += not ok

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("uvicorn", "ray"), default="uvicorn")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--model", default="ct-covid-mobilenet_v2", help="served model (name or bundle path)")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas")
    parser.add_argument("--size", type=int, default=512, help="side of the PNG sent")
    args = parser.parse_args()
    if args.clients * args.requests > 2000:
        parser.error("keep the load bounded: at most 2000 requests in all")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("COVIDSCAN_API_KEY", None)
    port = free_port()
    command = [sys.executable, "-m", "covidscan", "serve", "--port", str(port), "--model", args.model]
    head = temp_dir = None
    if args.backend == "ray":
        head, address, temp_dir = start_ray_head(env, cpus=max(args.replicas, 1))
        command += ["--ray-address", address, "--replicas", str(args.replicas), "--cpus-per-replica", "1"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(f"{base}/healthz", server, timeout=900)
        png = encode(gradient_image(args.size, args.size), "PNG")
        model_name = Path(args.model).name
        url = f"{base}/v1/predict?model={model_name}"
        httpx.post(url, files=[("files", ("warm.png", png))], timeout=120)  # one warm-up request
        memory_pid = head.pid if head is not None else server.pid
        before = tree_rss_mib(memory_pid)
        result = run_load(url, png, args.clients, args.requests)
        after = tree_rss_mib(memory_pid)
    finally:
        stop(server, signal.SIGINT)
        if head is not None:
            stop(head)
            shutil.rmtree(temp_dir, ignore_errors=True)
    report = {"backend": args.backend, "replicas": args.replicas if args.backend == "ray" else 1,
              "model": args.model, "clients": args.clients, "requests_per_client": args.requests, **result,
              "server_rss_mib_before": round(before, 1), "server_rss_mib_after": round(after, 1),
              "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
