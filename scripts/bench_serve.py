"""`bench.py serve`: `captioner serve` under load, dynamic batching on against off, same run.

    python scripts/bench.py serve [--json] [--run RUN] [--seconds 30] [--clients 8,64]

Two servers in turn, both `captioner serve` subprocesses on 127.0.0.1 only: batching on (the
defaults: --max-batch 64, --max-wait-ms 5) and off (--max-batch 1), each started (and its batch
sizes compiled) before the clock starts. Against each, N client threads (one keep-alive
connection each) send one image per predict request, back to back, for --seconds per N or until
--max-requests in all, whichever comes first. Reported per server and
N: requests/s, p50 and p99 latency, failed requests (any answer but 200, or no answer), and the
mean batch size formed (from the server's /stats, before and after); the server's resident
memory (VmRSS) sampled every 0.5 s: before the load, half-way through each load and at its
end. The clients share the machine with the server; so do other users of a shared machine (the
load average is recorded). The worker's milliseconds per image (/stats' busy seconds) show
what batching saves inside TensorFlow: encoder, decoder and scoring.

Without --run, a run is trained first on the synthetic dataset with the small MobileNetV3 encoder
(random weights, as offline), whose captions follow the image; the images sent are its dataset's.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_common import machine, report

TRAIN = ["--dataset", "demo", "--name", "bench", "--set", "features.encoder=mobilenetv3small"]
TRAIN += ["--set=demo.train_images=300", "--set=demo.dev_images=30", "--set=demo.test_images=30"]
TRAIN += ["--set=train.epochs=8", "--set=train.learning_rate=0.003"]


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py serve")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--run", help="a run directory (default: train a small demo run)")
    parser.add_argument("--images", help="folder of images to send (default: the run's dataset)")
    parser.add_argument("--seconds", type=float, default=30.0, help="of load per client count")
    parser.add_argument("--clients", default="8,64", help="concurrent clients, comma-separated")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per client count")
    parser.add_argument("--max-batch", default="64", help="of the batching server")
    args = parser.parse_args(argv)
    clients = [int(n) for n in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else train_run(Path(tmp))
        # a run's data.data_dir is relative to where it was trained: here, or tmp for ours
        base = Path.cwd() if args.run else Path(tmp)
        folder = Path(args.images) if args.images else images_of(run_dir, base)
        bodies = [
            json.dumps({"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()}]})
            for p in sorted(folder.glob("*.jpg"))[:64]
        ]
        result: dict = {"run": str(run_dir), "images": len(bodies), "seconds": args.seconds}
        modes = {"batching": ["--max-batch", args.max_batch], "no_batching": ["--max-batch", "1"]}
        for mode, options in modes.items():
            for key, value in load_server(run_dir, options, bodies, clients, args).items():
                result[f"{mode}_{key}"] = value
    for n in clients:
        result[f"speedup_{n}"] = result[f"batching_rps_{n}"] / result[f"no_batching_rps_{n}"]
    result.update(machine())
    return report(result, args.json)


def train_run(folder: Path) -> Path:
    """A small demo run, trained by the CLI in `folder`."""
    command = [sys.executable, "-m", "captioner.cli", "train", *TRAIN, "--data-dir", "data"]
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return folder / "runs" / "bench"


def images_of(run_dir: Path, base: Path) -> Path:
    """The image folder of a run trained on the synthetic dataset (or in Flickr8k's layout)."""
    data = json.loads((run_dir / "config.json").read_text())["data"]
    return base / data["data_dir"] / data["dataset"] / "raw" / "Flicker8k_Dataset"


def load_server(run_dir: Path, options: list[str], bodies: list[str], clients, args) -> dict:
    """Start a server, put each client count's load on it, stop it; its numbers."""
    command = [sys.executable, "-m", "captioner.cli", "serve", "--run", str(run_dir)]
    process = subprocess.Popen(
        [*command, "--port", "0", *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 300)
        url = process.stdout.readline().decode().strip() if ready else ""
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError("captioner serve did not start")
        address = url.removeprefix("http://").split(":")
        host, port = address[0], int(address[1])
        name = run_dir.name
        memory = RssSampler(process.pid)
        result: dict = {"rss_start_mb": memory.now()}
        for n in clients:
            before = get_json(host, port, "/stats")
            first = len(memory.samples)
            numbers = put_load(host, port, name, bodies, n, args.seconds, args.max_requests)
            during = memory.samples[first:] or [memory.now()]
            numbers["rss_mid_mb"] = during[len(during) // 2]  # flat: the same as at the end
            after = get_json(host, port, "/stats")
            batches = after["batches"] - before["batches"]
            items = after["items"] - before["items"]
            numbers["mean_batch"] = items / max(batches, 1)
            # the worker's time per image: encoder, decoder and scoring at the batches formed
            numbers["worker_ms"] = (
                1000 * (after["busy_seconds"] - before["busy_seconds"]) / max(items, 1)
            )
            numbers["rss_mb"] = memory.now()
            numbers["load_average"] = os.getloadavg()[0]
            result.update({f"{key}_{n}": value for key, value in numbers.items()})
        memory.stop()
        result["rss_max_mb"] = max(memory.samples)
        result["rss_end_mb"] = memory.samples[-1]
        return result
    finally:
        process.terminate()  # only the server this benchmark started
        process.wait(timeout=120)


def put_load(host: str, port: int, name: str, bodies, clients: int, seconds: float, cap: int):
    """`clients` threads sending predict requests back to back; requests/s and latency."""
    latencies: list[float] = []
    failed, begun = [0], [0]  # begun: requests begun by any client (the cap counts these)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    path = f"/v1/models/{name}:predict"

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        sent = index
        while time.monotonic() < deadline:
            with lock:
                if begun[0] >= cap:
                    break
                begun[0] += 1
            start = time.perf_counter()
            ok = False
            try:
                connection.request("POST", path, bodies[sent % len(bodies)])
                response = connection.getresponse()
                ok = response.status == 200 and bool(json.loads(response.read())["predictions"])
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=60)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    failed[0] += 1
            sent += clients
        connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    times = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "failed": failed[0],
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(times, 50)) if len(times) else float("nan"),
        "p99_ms": float(np.percentile(times, 99)) if len(times) else float("nan"),
    }


def get_json(host: str, port: int, path: str) -> dict:
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


class RssSampler:
    """VmRSS of a process every `interval` seconds, in MiB, on a thread, until stop()."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.samples = pid, [self.now_of(pid)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def now_of(pid: int) -> float:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def now(self) -> float:
        return self.now_of(self.pid)

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append(self.now())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
