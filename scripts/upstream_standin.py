#!/usr/bin/env python3
"""Stand-ins for the executors' upstreams, on loopback (stdlib only), for scripts/schemathesis.sh,
scripts/otlp_test.sh and scripts/sdk_test.sh.

  POST /v1/chat/completions              an OpenAI-compatible chat completion with token usage; point
                                         CATRACA_LLM_BASE_URL at http://HOST:PORT/v1
  GET  /api/consulta/v1/contratacoes/E   E = publicacao | atualizacao: the PNCP consultation API, from
                                         the PNCP-shaped pages in --fixtures; point CATRACA_PNCP_BASE_URL
                                         at http://HOST:PORT/api/consulta
  GET  /health                           200, for readiness checks
  GET  /hits                             {"llm": n, "pncp": n, "traceparents": {"llm": [...],
                                         "pncp": [...]}, "llm_requests": [...]}: upstream requests
                                         answered so far, the W3C traceparent headers they carried (the
                                         last 100 each), and what the last 20 chat requests asked for

The chat answer is "Resumo: " and the first 120 characters of the last message's content, with usage
{prompt_tokens: len(content) // 4 + 1, completion_tokens: 32, total_tokens: their sum}. A request
with "stream": true gets the same text the way OpenAI streams it: Content-Type text/event-stream and
server-sent events `data: {json}\n\n`, each a `chat.completion.chunk` with the same id, created and
model: first a delta with role "assistant" and empty content, then several content deltas that put
the text together, then an empty delta with finish_reason "stop"; if the request had
"stream_options": {"include_usage": true}, every chunk carries "usage": null and one more chunk
follows with "choices": [] and the usage; then `data: [DONE]\n\n`, and the connection closes.

Each entry of llm_requests is {"roles": [the messages' roles, in order], "max_tokens": the request's
max_tokens or null, "stream": bool, "include_usage": bool, "model": ..., "last": the first 80
characters of the last message's content}: enough for a test to check what a gateway sent (its
system prompt first, the client's max_tokens passed on) without the stand-in keeping whole prompts.

The PNCP stand-in answers like the real API where the fixtures show how: a query without
dataInicial, dataFinal, codigoModalidadeContratacao or pagina, or with a date that is not a calendar day
(yyyyMMdd), gets the Spring Boot 400 body; a page past the last, or a range that ends before it starts,
gets 204 with no body (a query without results); any other query gets the fixture page for its endpoint
as the one and only page.

    python3 scripts/upstream_standin.py --port 9300 --fixtures tests/fixtures/pncp
"""
import argparse
import datetime
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 4 << 20  # a summary request holds one procurement text; 4 MiB is far above any
PNCP_PREFIX = "/api/consulta/v1/contratacoes/"
PNCP_PAGES = {"publicacao": "contratacoes_publicacao.json", "atualizacao": "contratacoes_atualizacao.json"}
REQUIRED = ("dataInicial", "dataFinal", "codigoModalidadeContratacao", "pagina")
LLM_REQUESTS_KEPT = 20
STREAM_PIECE = 12  # characters of the answer per content delta


def pieces(text: str, size: int = STREAM_PIECE) -> list:
    """The answer cut into content deltas: at least three when the text allows it."""
    size = max(1, min(size, len(text) // 3 or 1))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def what_was_asked(request: dict) -> dict:
    """The parts of a chat request that a test checks, not the prompts themselves."""
    messages = request.get("messages")
    messages = messages if isinstance(messages, list) else []
    last = messages[-1].get("content", "") if messages and isinstance(messages[-1], dict) else ""
    options = request.get("stream_options")
    return {
        "roles": [m.get("role") if isinstance(m, dict) else None for m in messages],
        "max_tokens": request.get("max_tokens"),
        "stream": request.get("stream") is True,
        "include_usage": isinstance(options, dict) and options.get("include_usage") is True,
        "model": request.get("model"),
        "last": (last if isinstance(last, str) else json.dumps(last))[:80],
    }


def calendar_day(text: str):
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fixtures", required=True, help="folder with the PNCP-shaped pages")
    ap.add_argument("--stream-delay-ms", type=float, default=5,
                    help="pause between two streamed chunks (default 5), so a relay is seen to stream")
    args = ap.parse_args()
    pages = {name: json.loads((Path(args.fixtures) / file).read_text()) for name, file in PNCP_PAGES.items()}
    lock = threading.Lock()
    hits = {"llm": 0, "pncp": 0}
    traceparents = {"llm": [], "pncp": []}
    llm_requests = []

    class Handler(BaseHTTPRequestHandler):
        server_version = "catraca-upstream-standin/1"

        def _reply(self, code: int, doc=None) -> None:
            body = b"" if doc is None else json.dumps(doc).encode()
            self.send_response(code)
            # The real API labels even its 204 application/json.
            self.send_header("Content-Type", "application/json")
            if code != 204:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if code != 204:
                self.wfile.write(body)

        def _count(self, upstream: str) -> None:
            with lock:
                hits[upstream] += 1
                if self.headers.get("traceparent"):
                    seen = traceparents[upstream]
                    seen.append(self.headers["traceparent"])
                    del seen[:-100]

        def _spring_400(self, path: str, message: str) -> None:
            self._reply(400, {
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "status": 400,
                "error": "Bad Request",
                "message": message,
                "path": "/pncp-consulta" + path.removeprefix("/api/consulta"),
            })

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            if url.path == "/health":
                return self._reply(200, {"status": "ok"})
            if url.path == "/hits":
                with lock:
                    return self._reply(200, dict(hits, traceparents=traceparents, llm_requests=llm_requests))
            endpoint = url.path.removeprefix(PNCP_PREFIX)
            if not url.path.startswith(PNCP_PREFIX) or endpoint not in pages:
                return self._reply(404, {"status": 404, "error": "Not Found", "path": url.path})
            self._count("pncp")
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            for name in REQUIRED:
                if name not in query:
                    return self._spring_400(
                        url.path, f"Required request parameter '{name}' for method parameter type "
                        f"{'Integer' if name == 'pagina' else 'Long' if name.startswith('codigo') else 'String'} "
                        "is not present")
            first, last = calendar_day(query["dataInicial"]), calendar_day(query["dataFinal"])
            if first is None or last is None:
                return self._spring_400(url.path, "Data inválida: use o formato yyyyMMdd")
            try:
                page = int(query["pagina"])
            except ValueError:
                return self._spring_400(url.path, "pagina must be a number")
            if last < first or page > 1:
                return self._reply(204)
            doc = dict(pages[endpoint])
            records = doc.get("data") or []
            doc.update(totalRegistros=len(records), totalPaginas=1, numeroPagina=1, paginasRestantes=0, empty=False)
            self._reply(200, doc)

        def do_POST(self) -> None:  # noqa: N802
            if urlsplit(self.path).path != "/v1/chat/completions":
                return self._reply(404, {"error": {"message": "no such route", "type": "invalid_request_error"}})
            self._count("llm")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._reply(413, {"error": {"message": "request too large", "type": "invalid_request_error"}})
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._reply(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            if not isinstance(request, dict):
                return self._reply(400, {"error": {"message": "body is not a JSON object",
                                                   "type": "invalid_request_error"}})
            with lock:
                llm_requests.append(what_was_asked(request))
                del llm_requests[:-LLM_REQUESTS_KEPT]
                number = hits["llm"]
            messages = request.get("messages")
            last = messages[-1] if isinstance(messages, list) and messages and isinstance(messages[-1], dict) else {}
            asked = str(last.get("content", ""))
            answer = f"Resumo: {asked[:120]}"
            usage = {"prompt_tokens": len(asked) // 4 + 1, "completion_tokens": 32,
                     "total_tokens": len(asked) // 4 + 33}
            completion_id = f"chatcmpl-standin-{number}"
            created = int(datetime.datetime.now().timestamp())
            model = request.get("model", "standin")
            if request.get("stream") is True:
                options = request.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                return self._stream(completion_id, created, model, answer, usage, include_usage)
            self._reply(200, {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "stop",
                }],
                "usage": usage,
            })

        def _stream(self, completion_id: str, created: int, model, answer: str, usage: dict,
                    include_usage: bool) -> None:
            """The answer as OpenAI streams it: server-sent events, then [DONE]; the connection closes
            after it (HTTP/1.0, no Content-Length)."""
            def chunk(choices: list, **extra) -> dict:
                doc = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": model, "system_fingerprint": None, "choices": choices}
                if include_usage:
                    doc["usage"] = None
                doc.update(extra)
                return doc

            def choice(delta: dict, finish_reason=None) -> list:
                return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

            events = [chunk(choice({"role": "assistant", "content": ""}))]
            events += [chunk(choice({"content": piece})) for piece in pieces(answer)]
            events.append(chunk(choice({}, "stop")))
            if include_usage:
                events.append(chunk([], usage=usage))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for n, event in enumerate(events):
                    if n and args.stream_delay_ms > 0:
                        time.sleep(args.stream_delay_ms / 1000)
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away mid-stream: nothing more to say
            self.close_connection = True

        def log_message(self, fmt: str, *fargs) -> None:
            sys.stderr.write("standin: " + (fmt % fargs) + "\n")

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
