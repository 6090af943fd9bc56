"""`captioner serve` for real: a run trained here on the synthetic dataset, served by the CLI in a
subprocess on a free loopback port, spoken to over HTTP as TensorFlow Serving clients and curl
users would. Its captions equal `captioner caption`'s; every kind of bad request gets a 4xx with
a one-line JSON error and the server answers the next one; concurrent requests are captioned in
batches; a run on dropped-in features takes feature vectors; SIGTERM answers requests in flight.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from processes import stop

from captioner.cli import main
from captioner.config import from_dict
from captioner.io import read_json, write_json

# Small enough to train in well under a minute, trained enough that captions follow the image.
TRAIN = ["--dataset", "demo", "--name", "tiny", "--set", "features.encoder=mobilenetv3small"]
TRAIN += [f"--set={key}" for key in ("demo.train_images=100", "demo.dev_images=6")]
TRAIN += [f"--set={key}" for key in ("demo.test_images=6", "train.epochs=6")]
TRAIN += ["--set=train.learning_rate=0.005"]
IMAGES = 12  # images whose captions every test compares
LIMIT_MB = 1  # the session server's --max-request-mb
JSON = "application/json"


# --- a run, its expected captions, servers -------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """The run, its images and `captioner caption`'s captions of them, by file name."""
    root = tmp_path_factory.mktemp("serve")
    runs = root / "runs"
    args = ["train", *TRAIN, "--data-dir", str(root / "data"), f"--set=train.runs_dir='{runs}'"]
    trained = CliRunner().invoke(main, args)
    assert trained.exit_code == 0, trained.output
    images = sorted((root / "data" / "demo" / "raw" / "Flicker8k_Dataset").glob("*.jpg"))[:IMAGES]
    done = CliRunner().invoke(
        main, ["caption", "--json", "--model", str(runs / "tiny"), *map(str, images)]
    )
    assert done.exit_code == 0, done.output
    expected = {
        Path(record["image"]).name: record["caption"]
        for record in map(json.loads, done.stdout.splitlines())
    }
    assert len(expected) == IMAGES and len(set(expected.values())) > 1  # captions differ
    cache = from_dict(read_json(runs / "tiny" / "config.json")).features_dir  # the run's cache
    rows = {name: i for i, name in enumerate((cache / "ids.txt").read_text().splitlines())}
    features = np.load(cache / "features.npy")
    return {
        "dir": runs / "tiny",
        "images": images,
        "expected": expected,
        "features": {image.name: features[rows[image.name]].tolist() for image in images},
    }


def start_server(run_dir: Path, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`captioner serve --port 0` in a subprocess; its URL once it takes requests."""
    command = [sys.executable, "-m", "captioner.cli", "serve", "--run", str(run_dir), "--port", "0"]
    with open(log, "wb") as stderr:
        process = subprocess.Popen([*command, *options], stdout=subprocess.PIPE, stderr=stderr)
    ready, _, _ = select.select([process.stdout], [], [], 240)
    url = process.stdout.readline().decode().strip() if ready else ""
    if not url.startswith("http://127.0.0.1:"):
        stop(process)
        pytest.fail(f"captioner serve did not start: {log.read_text()[-3000:]}")
    return process, url


@pytest.fixture(scope="session")
def server(tiny_run, tmp_path_factory):
    """The run served with a short batching wait, batches of up to 16 (fewer to compile at
    start) and a 1 MiB request limit."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    options = ("--max-wait-ms", "50", "--max-request-mb", str(LIMIT_MB), "--max-batch", "16")
    process, url = start_server(tiny_run["dir"], log, *options)
    yield url
    stop(process)


# --- HTTP as a client sees it --------------------------------------------------------------------
def call(url: str, body: bytes | None = None, content_type: str = JSON):
    """(status, JSON body, headers) of a GET (no body) or POST."""
    headers = {"Content-Type": content_type} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def predict_body(*instances) -> bytes:
    return json.dumps({"instances": list(instances)}).encode()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "test-boundary-7d1e"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def decompression_bomb() -> bytes:
    """A valid PNG whose header says 30000 x 30000 pixels: 10x Pillow's limit, 70 bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's checksum
    return bytes(data)


# --- the tests ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_status_predict_and_caption_give_captioner_captions(server, tiny_run):
    expected, images = tiny_run["expected"], tiny_run["images"]
    predict = f"{server}/v1/models/tiny:predict"
    status, body, _ = call(f"{server}/v1/models/tiny")
    assert status == 200 and body == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    status, body, _ = call(f"{server}/v1/models/tiny/metadata")
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200 and list(signature["inputs"]) == ["image_bytes"]
    assert sorted(signature["outputs"]) == ["caption", "log_prob"]

    # Row format: one prediction per instance, in order; captions are `captioner caption`'s.
    status, body, headers = call(predict, predict_body(*(b64(p.read_bytes()) for p in images)))
    assert status == 200 and list(body) == ["predictions"]
    assert [p["caption"] for p in body["predictions"]] == [expected[p.name] for p in images]
    log_probs = [p["log_prob"] for p in body["predictions"]]
    assert all(isinstance(v, float) and v < 0 for v in log_probs)
    assert int(headers["X-Batch-Size"]) >= 1
    # Columnar format, the named input and a version in the path: the same answers.
    named = {"inputs": {"image_bytes": [b64(p.read_bytes()) for p in images[:3]]}}
    status, body, _ = call(
        f"{server}/v1/models/tiny/versions/1:predict", json.dumps(named).encode()
    )
    assert status == 200 and body == {
        "outputs": {
            "caption": [expected[p.name] for p in images[:3]],
            "log_prob": pytest.approx(log_probs[:3], abs=1e-4),
        }
    }
    # The image's features as the instance: the caption the image gets.
    features = [tiny_run["features"][p.name] for p in images[3:6]]
    status, body, _ = call(predict, predict_body(*features))
    assert status == 200
    assert [p["caption"] for p in body["predictions"]] == [expected[p.name] for p in images[3:6]]

    # Plain multipart for curl users.
    status, body, _ = call(
        f"{server}/caption", *multipart([(p.name, p.read_bytes()) for p in images[:2]])
    )
    assert status == 200 and body["model"] == "tiny"
    assert [(c["file"], c["caption"]) for c in body["captions"]] == [
        (p.name, expected[p.name]) for p in images[:2]
    ]
    assert [c["log_prob"] for c in body["captions"]] == pytest.approx(log_probs[:2], abs=1e-4)


def bad_requests(tiny_run) -> dict:
    """name -> (path, body, content type, status, start of the error message)."""
    image = tiny_run["images"][0].read_bytes()
    oversized = predict_body(b64(image * (LIMIT_MB * 2**20 // len(image) + 1)))
    too_many = predict_body(*[tiny_run["features"][tiny_run["images"][0].name]] * 65)
    predict = "/v1/models/tiny:predict"
    return {
        "too large": (predict, oversized, JSON, 413, "request body over 1 MiB"),
        "decompression bomb": (
            predict,
            predict_body(b64(decompression_bomb())),
            JSON,
            400,
            "instances[0]: too large: over Pillow's limit of",
        ),
        "not an image": (
            predict,
            predict_body(b64(image), b64(b"GIF89a, or so it says")),
            JSON,
            400,
            "instances[1]: not an image Pillow can read",
        ),
        "empty body": (predict, b"", JSON, 400, "empty request body"),
        "malformed JSON": (predict, b'{"instances": [{"b64": ', JSON, 400, "malformed JSON"),
        "no instances": (
            predict,
            b'{"images": []}',
            JSON,
            400,
            'the request must be a JSON object with "instances"',
        ),
        "not base64": (
            predict,
            predict_body({"b64": "not base64!"}),
            JSON,
            400,
            "instances[0].b64: not valid base64",
        ),
        "wrong features": (
            predict,
            predict_body([1.0, 2.0]),
            JSON,
            400,
            "instances[0]: features must be numbers in shape [576], got shape [2]",
        ),
        "too many instances": (
            predict,
            too_many,
            JSON,
            400,
            "instances: 65 instances; send at most 64",
        ),
        "unknown model": (
            "/v1/models/other:predict",
            predict_body(b64(image)),
            JSON,
            404,
            "Servable not found",
        ),
        "caption: not an image": (
            "/caption",
            *multipart([("notes.txt", b"hello")]),
            400,
            "file 'notes.txt': not an image Pillow can read",
        ),
        "caption: empty file": (
            "/caption",
            *multipart([("empty.jpg", b"")]),
            400,
            "file 'empty.jpg': empty file",
        ),
        "caption: not multipart": (
            "/caption",
            predict_body(b64(image)),
            JSON,
            400,
            "send the images as multipart/form-data",
        ),
        "unknown path": ("/v2/anything", b"{}", JSON, 404, "Not Found"),
    }


@pytest.mark.slow
def test_every_bad_request_gets_a_4xx_one_line_error_and_the_server_carries_on(server, tiny_run):
    good = predict_body(b64(tiny_run["images"][0].read_bytes()))
    first_caption = tiny_run["expected"][tiny_run["images"][0].name]
    for name, (path, body, content_type, status, message) in bad_requests(tiny_run).items():
        got_status, got, _ = call(server + path, body, content_type)
        assert (got_status, list(got)) == (status, ["error"]), (name, got)
        assert got["error"].startswith(message) and "\n" not in got["error"], (name, got)
        status_after, after, _ = call(f"{server}/v1/models/tiny:predict", good)
        assert status_after == 200 and after["predictions"][0]["caption"] == first_caption, name


@pytest.mark.slow
def test_a_body_over_the_limit_sent_in_chunks_is_refused_too(server):
    """No Content-Length to go by: the server counts what arrives."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b"x" * 65536 for _ in range(LIMIT_MB * 16 + 1))
    connection.request(
        "POST",
        "/v1/models/tiny:predict",
        body=chunks,
        headers={"Content-Type": JSON},
        encode_chunked=True,
    )
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"].startswith(
        "request body over"
    )
    connection.close()


@pytest.mark.slow
def test_concurrent_requests_are_captioned_in_batches_with_the_same_captions(server, tiny_run):
    images, expected = tiny_run["images"], tiny_run["expected"]
    before = call(f"{server}/stats")[1]
    clients = 2 * len(images)
    barrier = threading.Barrier(clients)

    def one(index: int):
        image = images[index % len(images)]
        barrier.wait()  # every client sends at once
        status, body, headers = call(
            f"{server}/v1/models/tiny:predict", predict_body(b64(image.read_bytes()))
        )
        return (
            status,
            body["predictions"][0]["caption"],
            expected[image.name],
            int(headers["X-Batch-Size"]),
        )

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(clients)))
    assert all(status == 200 and got == want for status, got, want, _ in answers)
    assert max(size for *_, size in answers) > 1  # batched, and batching changed no caption
    after = call(f"{server}/stats")[1]
    assert after["items"] - before["items"] == clients
    assert after["batches"] - before["batches"] < clients and after["largest_batch"] > 1
    assert after["max_batch"] == 16 and after["decoding"]["beam"] == 3


@pytest.mark.slow
def test_dropped_in_features_run_and_sigterm_with_a_request_in_flight(tiny_run, tmp_path):
    """A run whose features came from elsewhere has no encoder: it takes feature vectors and
    says so for images. SIGTERM: the request in flight (waiting 1.5 s for a batch) is answered,
    then the server exits cleanly and stops listening."""
    run_dir = tmp_path / "dropped"
    shutil.copytree(tiny_run["dir"], run_dir)
    meta = read_json(run_dir / "features_meta.json")
    write_json(
        run_dir / "features_meta.json",
        {"encoder": "handmade", "dim": meta["dim"], "count": meta["count"]},
    )
    log = tmp_path / "serve.log"
    process, url = start_server(
        run_dir, log, "--max-wait-ms", "1500", "--max-batch", "4", "--name", "mine"
    )
    try:
        predict = f"{url}/v1/models/mine:predict"
        image = tiny_run["images"][0]
        status, body, _ = call(predict, predict_body(b64(image.read_bytes())))
        assert status == 400 and body["error"].startswith(
            "instances[0]: this run's features came from 'handmade'"
        )
        assert "send the image's features (shape [576])" in body["error"]

        def caption(index: int) -> tuple[int, str, float]:
            start = time.monotonic()
            features = tiny_run["features"][tiny_run["images"][index].name]
            status, body, _ = call(predict, predict_body(features))
            return status, body["predictions"][0]["caption"], time.monotonic() - start

        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(caption, 1)
            time.sleep(0.5)
            assert not in_flight.done()
            process.send_signal(signal.SIGTERM)
            status, text, seconds = in_flight.result(timeout=60)
        assert (status, text) == (200, tiny_run["expected"][tiny_run["images"][1].name])
        assert seconds >= 1.4  # it waited for its batch, across the SIGTERM
        assert process.wait(timeout=60) == 0
    finally:
        stop(process)
    assert (
        "serving feature vectors only" in log.read_text() and "stopped; 1 images" in log.read_text()
    )
    with pytest.raises(urllib.error.URLError):
        call(f"{url}/v1/models/mine")


def test_sigterm_the_moment_the_url_is_printed_stops_the_server(tiny_run, tmp_path):
    """A process manager may stop the server as soon as it says it is up. The URL was once
    printed before uvicorn's SIGTERM handler was in place, and a SIGTERM then was ignored."""
    process, _ = start_server(tiny_run["dir"], tmp_path / "serve.log", "--max-batch", "1")
    try:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        stop(process)


def test_a_taken_port_or_a_missing_run_is_one_line_before_any_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = CliRunner().invoke(main, ["serve", "--run", str(tmp_path), "--port", port])
    assert result.exit_code == 1
    assert result.output.startswith(
        f"Error: 127.0.0.1:{port}: cannot listen (Address already in use)"
    )
    result = CliRunner().invoke(main, ["serve", "--run", str(tmp_path / "none"), "--port", "0"])
    assert result.exit_code == 1 and "no config.json, not a finished training run" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_the_load_benchmark_runs_end_to_end(tiny_run, capsys):
    """`scripts/bench.py serve` on a short load, so the benchmark cannot rot."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_serve

    folder = str(tiny_run["images"][0].parent)
    args = ["--json", "--run", str(tiny_run["dir"]), "--images", folder, "--seconds", "1"]
    result = bench_serve.main(
        [*args, "--clients", "1,6", "--max-requests", "40", "--max-batch", "4"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    for mode in ("batching", "no_batching"):
        for n in (1, 6):
            assert 0 < result[f"{mode}_requests_{n}"] <= 40 and result[f"{mode}_failed_{n}"] == 0
            assert 0 < result[f"{mode}_p50_ms_{n}"] <= result[f"{mode}_p99_ms_{n}"]
            assert result[f"{mode}_worker_ms_{n}"] > 0
            assert result[f"{mode}_rss_mid_mb_{n}"] > 100
        assert result[f"{mode}_rss_max_mb"] >= result[f"{mode}_rss_start_mb"] > 100
    assert result["no_batching_mean_batch_6"] == 1 and result["batching_mean_batch_1"] == 1
    assert result["speedup_6"] == result["batching_rps_6"] / result["no_batching_rps_6"]
