"""The demo's HTTP side: Python's ThreadingHTTPServer, one static page and a small JSON API.

    GET  /                         the page (farmer/demo/page.html)
    GET  /api/card                 model card and the limits the form needs
    GET  /api/status               {"busy", "job", "done", "total"}: the progress bar polls it
    POST /api/sample               JSON SampleRequest -> grid layout and result URLs (429 while busy)
    POST /api/score[?invert=1]     image file bytes as the body -> bits/dim and the likeliest class
    POST /api/score?test_index=I   the same for test image I (or "random") of the checkpoint's data
    GET  /api/result/ID.png|.npz   a finished grid

Every error is a JSON object {"error": message} with a 4xx status (5xx only for a bug), never a
traceback page; the traceback of a 500 goes to the server's stderr.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from farmer.demo.app import ApiError, DemoApp, Limits

RESULT_PATH = re.compile(r"/api/result/(\d+)\.(png|npz)")
ROUTES = {"/": ("GET",), "/api/card": ("GET",), "/api/status": ("GET",), "/api/sample": ("POST",),
          "/api/score": ("POST",)}
# An oversized body is read and dropped up to this size so the client sees the 413 rather than a reset.
DRAIN_LIMIT = 64 * 2**20


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode())


def _query_int(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        return int(values[-1])
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {values[-1]!r}") from None


class DemoServer(ThreadingHTTPServer):
    """Serves one DemoApp; each request runs in its own daemon thread, so /api/status answers while a
    sampling request is still running."""

    daemon_threads = True

    def __init__(self, app: DemoApp, host: str, port: int, quiet: bool = False) -> None:
        self.app = app
        self.quiet = quiet
        self.page = resources.files("farmer.demo").joinpath("page.html").read_bytes()
        super().__init__((host, port), DemoHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "farmer-demo"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, unsupported method) as JSON, not HTML."""
        self._send(json_response({"error": message or HTTPStatus(code).phrase}, code))

    # Routing ------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        try:
            response = self._route(method)
        except ApiError as err:
            response = json_response({"error": err.message}, err.status)
        except (ValueError, TypeError) as err:  # the library's checks on a request's values
            response = json_response({"error": str(err)}, 400)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            response = json_response({"error": f"internal error ({type(err).__name__}): {err}"}, 500)
        self._send(response)

    def _route(self, method: str) -> Response:
        url = urlsplit(self.path)
        app = self.server.app
        result = RESULT_PATH.fullmatch(url.path)
        allowed = ("GET",) if result else ROUTES.get(url.path)
        if allowed is None:
            raise ApiError(404, f"no such page: {url.path}")
        if method not in allowed:
            raise ApiError(405, f"{url.path} takes {', '.join(allowed)}, not {method}")
        if result:
            return self._result(int(result[1]), result[2])
        if url.path == "/":
            return Response(200, self.server.page, "text/html; charset=utf-8")
        if url.path == "/api/card":
            return json_response(app.card)
        if url.path == "/api/status":
            return json_response(app.status())
        if url.path == "/api/sample":
            return json_response(app.sample(self._json_body()))
        return json_response(self._score(parse_qs(url.query)))

    def _result(self, result_id: int, kind: str) -> Response:
        body = self.server.app.result(result_id, kind)
        content_type = "image/png" if kind == "png" else "application/octet-stream"
        disposition = f'inline; filename="farmer-samples-{result_id}.{kind}"'
        return Response(200, body, content_type, {"Content-Disposition": disposition})

    def _score(self, query: dict[str, list[str]]) -> dict[str, Any]:
        app = self.server.app
        if "test_index" in query:
            self._body(0)  # a test image request has no body
            random_pick = query["test_index"][-1] == "random"
            pixels, label, index = app.test_image(None if random_pick else _query_int(query, "test_index"))
            return {**app.score(pixels), "label": label, "test_index": index}
        invert = _query_int(query, "invert") or 0
        return app.score(app.decode_upload(self._body(app.limits.max_upload_bytes), bool(invert)))

    # Bodies -------------------------------------------------------------------------------------------
    def _body(self, limit: int) -> bytes:
        """The request body, refused with 411/413 before it is read when it has no length or too much."""
        text = self.headers.get("Content-Length")
        if text is None:
            if self.headers.get("Transfer-Encoding"):
                raise ApiError(411, "send the body with a Content-Length (chunked uploads are not supported)")
            return b""
        try:
            length = int(text)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {text!r}") from None
        if length < 0:
            raise ApiError(400, f"bad Content-Length {text!r}")
        if length > limit:
            if length <= DRAIN_LIMIT:
                self.rfile.read(length)
            self.close_connection = True
            raise ApiError(413, f"the body has {length:,} bytes; the limit is {limit:,}")
        return self.rfile.read(length)

    def _json_body(self) -> Any:
        body = self._body(self.server.app.limits.max_json_bytes)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def make_server(app: DemoApp, host: str = "127.0.0.1", port: int = 7860, quiet: bool = False) -> DemoServer:
    """Bind (port 0 picks a free one) without serving yet; OSError as a RuntimeError with the address."""
    try:
        return DemoServer(app, host, port, quiet)
    except OSError as err:
        raise RuntimeError(f"cannot listen on {host}:{port}: {err}") from None


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu",
          limits: Limits | None = None) -> None:
    """Load the checkpoint and serve the page until Ctrl-C."""
    server = make_server(DemoApp.load(checkpoint, device, limits), host, port)
    if not is_loopback(host):
        print(f"farmer demo: warning: {host} is not a loopback address; anyone who can reach it can use "
              "this machine's CPU through the demo", file=sys.stderr)
    print(f"farmer demo: {checkpoint} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
