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

Other web pages open in the user's browser must not start jobs or read results: a request is served only when
its Host is the address the server is bound to (a DNS-rebinding page sends its own name), when its Origin, if
any, is this server, and when a POST's Content-Type is one a cross-site form or a plain fetch cannot send
(application/json; an upload's image/* or application/octet-stream), so the browser would have to ask first
(a CORS preflight, which this server never grants).
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
from farmer.io import FarmerError

RESULT_PATH = re.compile(r"/api/result/(\d+)\.(png|npz)")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?")
# What each POST takes (a prefix of the Content-Type): /api/score's uploads come with the image's own type.
POST_TYPES = {"/api/sample": ("application/json",),
              "/api/score": ("application/json", "image/", "application/octet-stream")}
MAX_JSON_DEPTH = 8  # a sample request is one flat object; deeper nesting is refused before json.loads recurses
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
        self.host = host
        self.host_names = bound_host_names(host)

    def host_allowed(self, header: str) -> bool:
        """Whether a request's Host header names this server: a name it is bound to, with its port."""
        name, port = split_host(header.strip().lower())
        if port != self.server_address[1] and not (port is None and self.server_address[1] == 80):
            return False
        return name in self.host_names or (self.host in WILDCARD_HOSTS and is_ip_literal(name))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "farmer-demo"

    def setup(self) -> None:
        # Every read and write on the connection gives up after this long: a client that opens connections
        # and never finishes its headers would otherwise hold one thread each for ever.
        self.timeout = self.server.app.limits.socket_timeout_s
        super().setup()

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

    def _check_sender(self, method: str, path: str) -> None:
        """Refuse requests that another web page could have sent (see the module docstring)."""
        host = self.headers.get("Host")
        if host is None or not self.server.host_allowed(host):
            raise ApiError(403, f"Host {_clip(host)} is not this server's address; open {self.server.url}")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host.strip().lower()}":
            raise ApiError(403, f"cross-origin request from {_clip(origin)} refused")
        if method == "POST":
            content_type = self.headers.get_content_type() if "Content-Type" in self.headers else "none"
            expected = POST_TYPES.get(path, ("application/json",))
            if not content_type.startswith(expected):
                wanted = " or ".join(kind + "*" if kind.endswith("/") else kind for kind in expected)
                raise ApiError(415, f"POST {path} needs Content-Type {wanted}, got {_clip(content_type)}")

    def _route(self, method: str) -> Response:
        url = urlsplit(self.path)
        app = self.server.app
        self._check_sender(method, url.path)
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
            text = body.decode()
        except UnicodeDecodeError as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested {depth:,} deep; the limit is {MAX_JSON_DEPTH}")
        try:
            return json.loads(text)
        except ValueError as err:
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


def _clip(text: str | None, limit: int = 60) -> str:
    """A header value for an error message: quoted, and short whatever the client sent."""
    return repr(text) if text is None or len(text) <= limit else repr(text[:limit]) + "..."


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in a JSON text, strings skipped: json.loads would recurse that deep."""
    brackets = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def split_host(header: str) -> tuple[str, int | None]:
    """'name:port', '[v6]:port' or a bare name -> (name, port or None); anything else -> (header, -1)."""
    match = HOST_HEADER.fullmatch(header)
    if match is None:
        return header, -1
    return match[1], None if match[2] is None else int(match[2])


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def bound_host_names(host: str) -> frozenset[str]:
    """The names a request's Host may carry for a server bound to ``host``: that name, and the loopback names
    when it is a loopback address. Bound to every interface, the loopback names and this machine's own names
    (and any IP address: DemoServer.host_allowed); never another DNS name, which is what a DNS-rebinding page
    would send."""
    if host in WILDCARD_HOSTS:
        return frozenset({*LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()})
    names = {f"[{host}]".lower() if ":" in host else host.lower()}
    if is_loopback(host):
        names.update(LOOPBACK_NAMES)
    return frozenset(names)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host if is_ip_literal(host) else socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def make_server(app: DemoApp, host: str = "127.0.0.1", port: int = 7860, quiet: bool = False) -> DemoServer:
    """Bind (port 0 picks a free one) without serving yet; OSError as a RuntimeError with the address."""
    try:
        return DemoServer(app, host, port, quiet)
    except OSError as err:
        raise FarmerError(f"cannot listen on {host}:{port}: {err}") from None


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
