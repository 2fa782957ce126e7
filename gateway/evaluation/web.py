"""The sidecar's HTML pages over HTTP on localhost: ``/`` lists models, ``/report/MODEL`` shows
one (``?window_s=N`` for another window)."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from gateway.evaluation.service import EvaluationServicer

__all__ = ["PageServer"]

log = logging.getLogger(__name__)

_TIMEOUT_S = 120


class PageServer:
    """A threaded HTTP server in a daemon thread; pages are computed on the store's thread."""

    def __init__(self, servicer: EvaluationServicer, host: str, port: int) -> None:
        def handler(*args: Any) -> _Handler:
            return _Handler(servicer, *args)

        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, servicer: EvaluationServicer, *args: Any) -> None:
        self.servicer = servicer
        super().__init__(*args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        db = self.servicer.db
        try:
            if url.path == "/":
                body = db.submit(self.servicer.index_page).result(_TIMEOUT_S)
            elif url.path.startswith("/report/"):
                model = unquote(url.path[len("/report/") :])
                window = parse_qs(url.query).get("window_s", ["0"])[0]
                window_s = int(window) if window.isascii() and window.isdigit() else 0
                body = db.submit(self.servicer.report_page, model, window_s).result(_TIMEOUT_S)
            else:
                self.send_error(404, "no such page: try / or /report/MODEL")
                return
        except Exception:
            log.exception("page %s failed", self.path)
            self.send_error(500, "the page failed; the sidecar log has the details")
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)
