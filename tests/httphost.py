"""A real HTTP server on a free loopback port serving an artifact directory
with Range requests — and the ways a hostile or broken mirror misbehaves."""

from __future__ import annotations

import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODES = (
    "redirect_elsewhere",
    "good",
    "corrupt",
    "slow",
    "swap",
    "redirect_loop",
    "no_range",
    "oversize",
    "down",
    "throttled",
)


class HttpHost:
    def __init__(
        self, root: Path, mode: str = "good", tls: tuple[Path, Path] | None = None, elsewhere: str = ""
    ) -> None:
        """``tls``: (certificate, key) to serve https; ``elsewhere``: where
        ``redirect_elsewhere`` sends every request (same path)."""
        assert mode in MODES
        self.root = root
        self.mode = mode
        self.elsewhere = elsewhere
        self.requests: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real static host
            disable_nagle_algorithm = True  # headers and body are separate writes

            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                host.requests.append(self.path)
                host.serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> HttpHost:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        if self.mode == "down":
            h.send_error(503)
            return
        if self.mode == "redirect_elsewhere":
            h.send_response(302)
            h.send_header("Location", self.elsewhere + h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.mode == "redirect_loop":
            h.send_response(302)
            h.send_header("Location", h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        path = self.root / h.path.lstrip("/").split("?")[0]
        if not path.is_file() or ".." in h.path:
            h.send_error(404)
            return
        total = path.stat().st_size
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
        if self.mode == "no_range" or m is None:
            h.send_response(200)
            h.send_header("Content-Length", str(total))
            h.end_headers()
            h.wfile.write(path.read_bytes())
            return
        lo, hi = int(m.group(1)), min(int(m.group(2)), total - 1)
        with open(path, "rb") as f:  # only the range: a 30 MB module is not read per chunk
            f.seek(lo)
            body = f.read(hi + 1 - lo)
        etag = '"v1"'
        if self.mode == "corrupt":
            body = bytes(b ^ 0xFF for b in body)
        if self.mode == "swap" and len(self.requests) > 1:  # a different file from the 2nd chunk on
            body, etag = bytes(b ^ 0x55 for b in body), '"v2"'
        if self.mode == "oversize":
            body = body + b"\0" * 4096
            h.close_connection = True  # no Content-Length: the body ends when the connection does
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {lo}-{hi}/{total}")
        h.send_header("ETag", etag)
        if self.mode != "oversize":
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if self.mode == "throttled":  # an honest but slow link: 20 ms per chunk
            time.sleep(0.02)
        if self.mode == "slow":  # slow-loris: a byte at a time, never quite silent
            h.close_connection = True
            for i in range(len(body)):
                h.wfile.write(body[i : i + 1])
                h.wfile.flush()
                time.sleep(0.05)
            return
        h.wfile.write(body)
