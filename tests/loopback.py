"""A threaded HTTP server on 127.0.0.1 for download tests: Range requests, cut transfers and
slow (trickling) transfers, each fault once per path."""

from __future__ import annotations

import http.server
import threading
import time


class Server:
    """A threaded HTTP server for `files`, with Range support and one-shot cut transfers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, int] = {}  # path -> bytes sent before hanging up (once)
        self.trickles: dict[str, float] = {}  # path -> seconds between single bytes (once)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
                if start >= len(body) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cuts.pop(self.path, None)
                delay = server.trickles.pop(self.path, None)
                if delay is None:
                    self.wfile.write(body[start:cut])  # HTTP/1.0: returning closes the connection
                    return
                try:  # one byte now and then, until the client gives up
                    for offset in range(start, len(body)):
                        self.wfile.write(body[offset : offset + 1])
                        self.wfile.flush()
                        time.sleep(delay)
                except OSError:
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
