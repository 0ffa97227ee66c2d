#!/usr/bin/env python3
"""An OTLP/HTTP trace receiver on loopback, for scripts/otlp_test.sh.

  POST /v1/traces   an ExportTraceServiceRequest (protobuf, optionally gzip), decoded with the official
                    definitions (PyPI `opentelemetry-proto`); each span is appended to --out as one JSON
                    line and the request is answered with an empty ExportTraceServiceResponse
  GET  /health      200

Each line: {"trace_id", "span_id", "parent_span_id" (hex, "" for none), "name", "kind" (SERVER, INTERNAL,
...), "status" (UNSET, OK, ERROR), "status_message", "start", "end" (unix nanoseconds), "attributes",
"resource" (attribute maps), "scope"}.

    python3 scripts/otlp_receiver.py --port 4318 --out spans.jsonl
"""
import argparse
import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

MAX_BODY = 16 << 20


def value_of(any_value):
    """An AnyValue as a plain Python value."""
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    if kind == "bytes_value":
        return any_value.bytes_value.hex()
    return getattr(any_value, kind)


def attributes(kvs):
    return {kv.key: value_of(kv.value) for kv in kvs}


def spans_of(request):
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                    "status": Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                    "status_message": span.status.message,
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                    "attributes": attributes(span.attributes),
                    "resource": resource,
                    "scope": scope_spans.scope.name,
                }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True, help="JSON Lines file the spans are appended to")
    args = ap.parse_args()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "catraca-otlp-receiver/1"

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                return self._reply(200, b"ok", "text/plain")
            return self._reply(404, b"not found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/traces":
                return self._reply(404, b"not found", "text/plain")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._reply(413, b"too large", "text/plain")
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-protobuf":
                return self._reply(415, b"protobuf expected", "text/plain")
            request = ExportTraceServiceRequest()
            try:
                request.ParseFromString(body)
            except Exception as e:  # noqa: BLE001 (any decoding failure is the sender's)
                return self._reply(400, f"not an ExportTraceServiceRequest: {e}".encode(), "text/plain")
            lines = [json.dumps(s, sort_keys=True) + "\n" for s in spans_of(request)]
            with lock, open(args.out, "a", encoding="utf-8") as out:
                out.writelines(lines)
            self._reply(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

        def log_message(self, fmt: str, *fargs) -> None:
            sys.stderr.write("otlp-receiver: " + (fmt % fargs) + "\n")

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
