"""Pieces every benchmark shares: the machine's matmul peak, timing, machine description."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable


def machine() -> dict:
    """What the numbers were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                "",
            )
    except OSError:
        pass
    import tensorflow as tf

    return {
        "cpu": model,
        "vector": vector_extensions(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }


def vector_extensions() -> str:
    """The widest vector units the CPU has: figures from one kind do not hold on another."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(next((line for line in handle if line.startswith("flags")), "").split())
    except OSError:
        return "unknown"
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return "AVX512-BF16/AMX" if "amx_bf16" in flags else "AVX512-BF16"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "no AVX2"


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall-clock seconds of `repeats` calls (after the caller has warmed up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_gflops(n: int = 4096, dtype: str = "float32") -> float:
    """Measured GFLOP/s of a large TensorFlow matrix product: the practical compute ceiling."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    b = tf.random.normal((n, n), dtype=tf.float32)
    if dtype != "float32":
        a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    matmul = tf.function(lambda x, y: tf.matmul(x, y))
    matmul(a, b).numpy()  # warm up
    seconds = best_time(lambda: matmul(a, b).numpy(), repeats=3)
    return 2 * n**3 / seconds / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Reads VmHWM from /proc/self/status: getrusage's ru_maxrss survives fork+exec, so a benchmark
    subprocess would report its parent's peak when the parent's was higher.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_epoch(script: str, write_features, images: int, lengths, seed: int) -> dict:
    """Peak RSS (MiB) and seconds of one epoch on `images` x 5 captions, run by `script
    --rss-child DIR --seed S` in its own process (so only that epoch counts): DIR holds
    features.npy, written by write_features(path, images, seed), and lengths.npy, caption
    lengths drawn from `lengths`. The child prints one JSON line {"peak_rss_mb", "seconds"}."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_features(Path(tmp) / "features.npy", images, seed)
        np.save(Path(tmp) / "lengths.npy", rng.choice(lengths, size=5 * images))
        result = subprocess.run(
            [sys.executable, script, "--rss-child", tmp, "--seed", str(seed)],
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rss_child_data(directory, seed: int, vocab_size: int) -> tuple:
    """In the RSS child: (features memory-mapped, rows (N,), N random captions of the lengths)."""
    from pathlib import Path

    import numpy as np

    features = np.load(Path(directory) / "features.npy", mmap_mode="r", allow_pickle=False)
    lengths = np.load(Path(directory) / "lengths.npy", allow_pickle=False)
    rng = np.random.default_rng(seed)
    captions = [rng.integers(4, vocab_size, int(n)).tolist() for n in lengths]
    rows = np.repeat(np.arange(features.shape[0]), 5)[: len(captions)]
    return features, rows, captions


def report(result: dict, as_json: bool) -> dict:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    return result
