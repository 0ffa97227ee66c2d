#!/usr/bin/env python3
"""Minimal Alertmanager webhook receiver for the observability contract (stdlib only).

Every POST body is appended to --out as one JSON line (a body that is not JSON is stored as
{"_raw": "<text>"} so nothing is lost). GET /health answers 200 for readiness checks.
Binds to loopback only.

    python3 scripts/webhook_receiver.py --port 9099 --out /tmp/alerts.jsonl
"""
import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20  # 1 MiB is far more than any Alertmanager notification


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True, help="JSON Lines file the POST bodies are appended to")
    args = ap.parse_args()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "catraca-webhook-receiver/1"

        def _reply(self, code: int, body: bytes = b"ok\n") -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            self._reply(200 if self.path in ("/health", "/") else 404)

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                self._reply(400, b"bad content-length\n")
                return
            if length < 0 or length > MAX_BODY:
                self._reply(413, b"too large\n")
                return
            raw = self.rfile.read(length)
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"_raw": raw.decode("utf-8", "replace")}
            line = json.dumps(doc, separators=(",", ":"), sort_keys=True)
            with lock, open(args.out, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
            self._reply(200)

        def log_message(self, fmt: str, *a) -> None:  # one line per request on stderr
            sys.stderr.write("webhook %s %s\n" % (self.address_string(), fmt % a))

    srv = ThreadingHTTPServer((args.host, args.port), Handler)
    sys.stderr.write("webhook receiver listening on %s:%d, writing %s\n" % (args.host, args.port, args.out))
    sys.stderr.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
