#!/usr/bin/env python3
"""Stand-ins for the executors' upstreams, on loopback (stdlib only), for scripts/schemathesis.sh.

  POST /v1/chat/completions              an OpenAI-compatible chat completion with token usage; point
                                         CATRACA_LLM_BASE_URL at http://HOST:PORT/v1
  GET  /api/consulta/v1/contratacoes/E   E = publicacao | atualizacao: the PNCP consultation API, from
                                         the PNCP-shaped pages in --fixtures; point CATRACA_PNCP_BASE_URL
                                         at http://HOST:PORT/api/consulta
  GET  /health                           200, for readiness checks
  GET  /hits                             {"llm": n, "pncp": n, "traceparents": {"llm": [...],
                                         "pncp": [...]}}: upstream requests answered so far, and the
                                         W3C traceparent headers they carried (the last 100 each)

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

MAX_BODY = 4 << 20  # a summary request holds one procurement text; 4 MiB is far above any
PNCP_PREFIX = "/api/consulta/v1/contratacoes/"
PNCP_PAGES = {"publicacao": "contratacoes_publicacao.json", "atualizacao": "contratacoes_atualizacao.json"}
REQUIRED = ("dataInicial", "dataFinal", "codigoModalidadeContratacao", "pagina")


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
    args = ap.parse_args()
    pages = {name: json.loads((Path(args.fixtures) / file).read_text()) for name, file in PNCP_PAGES.items()}
    lock = threading.Lock()
    hits = {"llm": 0, "pncp": 0}
    traceparents = {"llm": [], "pncp": []}

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
                    return self._reply(200, dict(hits, traceparents=traceparents))
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
            messages = request.get("messages") or [{}]
            asked = str(messages[-1].get("content", ""))
            self._reply(200, {
                "id": f"chatcmpl-standin-{hits['llm']}",
                "object": "chat.completion",
                "created": int(datetime.datetime.now().timestamp()),
                "model": request.get("model", "standin"),
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": f"Resumo: {asked[:120]}"},
                    "finish_reason": "stop",
                }],
                "usage": {"prompt_tokens": len(asked) // 4 + 1, "completion_tokens": 32,
                          "total_tokens": len(asked) // 4 + 33},
            })

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
