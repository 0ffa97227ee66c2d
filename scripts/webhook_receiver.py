#!/usr/bin/env python3
"""Minimal Alertmanager webhook receiver and upstream stand-ins for the observability contract (stdlib only).

Every POST body is appended to --out as one JSON line (a body that is not JSON is stored as
{"_raw": "<text>"} so nothing is lost). GET /health answers 200 for readiness checks.
Binds to loopback only.

So that the gateway's executors can run without leaving the machine, it also stands in for their upstreams:
  POST /v1/chat/completions          an OpenAI-compatible answer with token usage (point
                                     CATRACA_LLM_BASE_URL at http://HOST:PORT/v1)
  GET  /pncp/v1/contratacoes/<any>   a PNCP page that is held until POST /pncp/release (at most
                                     HOLD_SECONDS), then answered 204 (no records); point
                                     CATRACA_PNCP_BASE_URL at http://HOST:PORT/pncp. Holding it keeps a
                                     collector run (and its lock) open for as long as the caller needs.
  POST /pncp/release                 releases every PNCP request received so far
  GET  /hits                         {"pncp": n, "llm": n}: how many upstream requests arrived
These requests are not written to --out.

    python3 scripts/webhook_receiver.py --port 9099 --out /tmp/alerts.jsonl
"""
import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20  # 1 MiB is far more than any Alertmanager notification
# Longest a PNCP page is held without a release: below the collector's 30 s per-request timeout, so a
# forgotten release ends the run instead of piling up retries.
HOLD_SECONDS = 20.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True, help="JSON Lines file the POST bodies are appended to")
    args = ap.parse_args()
    lock = threading.Lock()
    upstream = threading.Condition()
    hits = {"pncp": 0, "llm": 0}
    released = [0]  # PNCP requests numbered up to this one may be answered

    class Handler(BaseHTTPRequestHandler):
        server_version = "catraca-webhook-receiver/1"

        def _reply(self, code: int, body: bytes = b"ok\n", ctype: str = "text/plain") -> None:
            self.send_response(code)
            if code != 204:
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if code != 204:
                self.wfile.write(body)

        def _json(self, doc: dict) -> None:
            self._reply(200, json.dumps(doc).encode(), "application/json")

        def _body(self):
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                self._reply(400, b"bad content-length\n")
                return None
            if length < 0 or length > MAX_BODY:
                self._reply(413, b"too large\n")
                return None
            return self.rfile.read(length)

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            path = self.path.split("?", 1)[0]
            if path.startswith("/pncp/v1/contratacoes/"):
                with upstream:
                    hits["pncp"] += 1
                    mine = hits["pncp"]
                    upstream.notify_all()
                    upstream.wait_for(lambda: released[0] >= mine, timeout=HOLD_SECONDS)
                self._reply(204)
            elif path == "/hits":
                with upstream:
                    counts = dict(hits)
                self._json(counts)
            else:
                self._reply(200 if path in ("/health", "/") else 404)

        def do_POST(self) -> None:  # noqa: N802
            raw = self._body()
            if raw is None:
                return
            path = self.path.split("?", 1)[0]
            if path == "/v1/chat/completions":
                with upstream:
                    hits["llm"] += 1
                self._json({
                    "id": "chatcmpl-contract", "object": "chat.completion", "created": 1767225600,
                    "model": "contract-stand-in",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "Resumo de teste."}}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
                })
                return
            if path == "/pncp/release":
                with upstream:
                    released[0] = hits["pncp"]
                    upstream.notify_all()
                self._reply(200)
                return
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
    srv.daemon_threads = True  # a held PNCP request must not keep the receiver from stopping
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
