"""`captioner serve`: a trained run behind HTTP (FastAPI on uvicorn), spoken to as TensorFlow
Serving's REST API, so a client written for TF Serving works unchanged.

    POST /v1/models/<name>:predict        {"instances": [{"b64": "..."}]} -> {"predictions": [...]}
    GET  /v1/models/<name>                status, as TF Serving answers it
    GET  /v1/models/<name>/metadata       the signature (input image_bytes; caption, log_prob)
    POST /caption                         multipart image files (curl -F image=@photo.jpg)
    GET  /stats                           the batches formed so far (batcher.Batcher.stats)

(`/v1/models/<name>/versions/1...` too: a run is served as version 1.) Request and response
shapes are serving.py's. Every request's instances are checked and decoded in one of
DECODE_THREADS threads, then queued for the one thread that runs TensorFlow, which captions
requests arriving within max_wait of each other as one batch (batcher.py); each answer carries
the size of the batch it was captioned in (header X-Batch-Size). A bad request gets a 4xx with a
one-line JSON error, {"error": "..."}, as TF Serving writes them, and the server carries on.
SIGTERM or Ctrl-C: no new connections, requests in flight are answered, then it exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from captioner.batcher import Batcher, ShuttingDown
from captioner.errors import CaptionerError
from captioner.io import log
from captioner.serving import MAX_INSTANCES, VERSION, ServedModel, predict_response

try:  # the optional extra: one readable line instead of an ImportError traceback
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
except ImportError:
    raise CaptionerError(
        "captioner serve needs fastapi and uvicorn; pip install 'captioner[serve]'"
    ) from None

GRACE_SECONDS = 30  # on SIGTERM, requests in flight get this long to finish
# Threads that check and decode requests' instances: one per core. Pillow lets go of the GIL
# while it decodes, so they use every core; more (Starlette's pool has 40) only fight over the
# GIL with the event loop and the batcher's thread: a tenth more CPU per request at 64 clients.
DECODE_THREADS = os.cpu_count() or 2
DRAIN_BYTES = 64 << 20  # past the size limit, a body is read (and dropped) this far before a 413


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8501,
    name: str = "",
    beam: int | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    max_request_mb: float = 32.0,
) -> None:
    """Listen on host:port (0 = any free port), load the run, print the server's URL on stdout
    once it takes requests, and serve until SIGTERM or Ctrl-C."""
    with _listen(host, port) as listener:  # first: a taken port fails at once
        model = ServedModel.load(run_dir, beam, name)
        model.warm_up(max_batch)
        batcher = Batcher(model.caption, max_batch, max_wait_ms / 1000)
        address = f"[{host}]" if ":" in host else host
        url = f"http://{address}:{listener.getsockname()[1]}"

        def ready() -> None:  # uvicorn's SIGTERM handler is in place: a stop now is honoured
            log(
                f"serving {run_dir} as model '{model.name}' on {url} (beam "
                f"{model.decoding.beam}, batches of up to {max_batch}, waiting {max_wait_ms:g} ms)"
            )
            print(url, flush=True)  # connections made from now on wait until uvicorn accepts

        _run(create_app(model, batcher, int(max_request_mb * (1 << 20)), ready), listener)
    log(f"stopped; {batcher.stats()['items']} images captioned")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise CaptionerError(
            f"{host}:{port}: cannot listen ({os.strerror(error.errno) if error.errno else error})"
            "; choose another --port "
            "or --host"
        ) from None


def _run(app: FastAPI, listener: socket.socket) -> None:
    """uvicorn on the listening socket until SIGTERM or SIGINT, after which it stops accepting
    connections and answers the requests in flight (for up to GRACE_SECONDS)."""
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE_SECONDS
    )
    # Once stopped, uvicorn raises the signal again for the handler it had replaced: ours for
    # SIGTERM (a clean exit), Python's KeyboardInterrupt for SIGINT.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def create_app(
    model: ServedModel,
    batcher: Batcher,
    max_request_bytes: int,
    ready: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The ASGI application; the batcher's worker runs while the application does, and `ready`
    is called once it has started (uvicorn handles SIGTERM and SIGINT from then on)."""

    decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(decoders, function, *args)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        ready()
        yield
        batcher.stop()  # after uvicorn has answered every request in flight
        decoders.shutdown()

    app = FastAPI(
        title="captioner", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(CaptionerError)
    async def bad_request(_request: Request, error: CaptionerError) -> JSONResponse:
        return _error(503 if isinstance(error, ShuttingDown) else 400, str(error))

    @app.exception_handler(Exception)
    async def failed(_request: Request, error: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {error.errors()[0].get('msg', error)}")

    def check(name: str, version: str = VERSION) -> None:
        if name != model.name or version != VERSION:
            raise HTTPException(404, f"Servable not found for request: {name} version {version}")

    async def predict(request: Request, name: str, version: str = VERSION) -> JSONResponse:
        check(name, version)
        instances, columnar = await in_thread(model.parse_predict, await request.body())
        results, batch_size = await batcher.submit(instances)
        return _answer(predict_response(results, columnar), batch_size)

    async def status(name: str, version: str = VERSION) -> dict:
        check(name, version)
        return model.status()

    async def metadata(name: str, version: str = VERSION) -> dict:
        check(name, version)
        return model.metadata()

    for prefix in ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"):
        app.add_api_route(prefix + ":predict", predict, methods=["POST"])
        app.add_api_route(prefix, status, methods=["GET"])
        app.add_api_route(prefix + "/metadata", metadata, methods=["GET"])

    @app.post("/caption")
    async def caption(request: Request) -> JSONResponse:
        files = await _uploads(request)
        instances = await in_thread(
            lambda: [model.image(data, f"file '{filename}'") for filename, data in files]
        )
        results, batch_size = await batcher.submit(instances)
        captions = [
            {"file": filename, "caption": text, "log_prob": log_prob}
            for (filename, _), (text, log_prob) in zip(files, results, strict=True)
        ]
        return _answer({"model": model.name, "captions": captions}, batch_size)

    @app.get("/stats")
    async def stats() -> dict:
        return {"model": model.name, "decoding": model.decoding.to_dict(), **batcher.stats()}

    return app


async def _uploads(request: Request) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file of a multipart/form-data body, in order."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise CaptionerError("send the images as multipart/form-data: curl -F image=@photo.jpg")
    async with request.form(max_files=MAX_INSTANCES, max_fields=MAX_INSTANCES) as form:
        files = [
            (value.filename or key, await value.read())
            for key, value in form.multi_items()
            if not isinstance(value, str)
        ]
    if not files:
        raise CaptionerError("no image file in the form; send one with curl -F image=@photo.jpg")
    return files


def _answer(content: dict, batch_size: int) -> JSONResponse:
    return JSONResponse(content, headers={"X-Batch-Size": str(batch_size)})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or sent) gets a 413 before the
    application sees it. The body is read into memory (it is at most max_bytes) and replayed to
    the application; past the limit it is read on and dropped, up to DRAIN_BYTES, so that the
    client, which sends its whole body before reading, gets the answer instead of a reset."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        length = int(declared) if declared.isdigit() else 0
        body, received, more = bytearray(), 0, length <= self.max_bytes + DRAIN_BYTES
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received <= self.max_bytes:
                body += chunk
            more = message.get("more_body", False) and received <= self.max_bytes + DRAIN_BYTES
        if max(length, received) > self.max_bytes:
            limit = f"{self.max_bytes / (1 << 20):g} MiB"
            response = _error(413, f"request body over {limit} (captioner serve --max-request-mb)")
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)
