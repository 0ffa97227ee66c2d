"""What the SDK tests share: checks that say what passed, plain HTTP reads of the gateway (the trail,
the stand-in), and key secrets kept out of the log. `tests/sdk/openai_test.py` and
`tests/sdk/mcp_test.py` import it from their own folder.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

# The test's name, for its lines ("openai sdk: ok  ..."); each test sets it.
NAME = "sdk"
TIMEOUT_S = float(os.environ.get("SDK_TIMEOUT_S", "60"))
PASSED = 0


class Failed(AssertionError):
    pass


def redact(text: object) -> str:
    """API key secrets never reach the log."""
    return re.sub(r"(ck_[A-Za-z0-9]+_)[A-Za-z0-9_-]{4,}", r"\1<redacted>", str(text))


def check(ok: bool, what: str, got: object = "") -> None:
    """Passes (and says so) or fails naming what was expected and what came."""
    global PASSED
    if not ok:
        raise Failed(f"{what}; got: {redact(got)}" if got != "" else what)
    PASSED += 1
    print(f"{NAME}: ok  {what}")


def env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "").strip()
    if required and not value:
        raise Failed(f"the environment variable {name} is not set")
    return value


def http_json(method: str, url: str, key: str | None = None, body: object = None,
              headers: dict | None = None) -> tuple[int, dict, object]:
    """(status, headers with lower-case names, parsed JSON body or the text) of one plain request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, raw, hdrs = response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), e.headers
    text = raw.decode("utf-8", "replace")
    try:
        parsed: object = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return status, {k.lower(): v for k, v in hdrs.items()}, parsed


def field(event: dict, name: str):
    """A type-specific field of an audit event: top level (the trail's shape), or under `payload`."""
    if name in event:
        return event[name]
    payload = event.get("payload")
    return payload.get(name) if isinstance(payload, dict) else None


def trace_events(base: str, auditor_key: str, trace_id: str, want_end: bool = True) -> list[dict]:
    """The trace's events as the auditor reads them right after the answer (REQUEST_END included):
    the gateway makes them durable before it answers, so they are read once, without waiting."""
    status, _, body = http_json("GET", f"{base}/v1/audit/traces/{trace_id}", auditor_key)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("events"), list):
        events = body["events"]
        if not want_end or any(e.get("event_type") == "REQUEST_END" for e in events):
            return events
    elif status != 404:
        raise Failed(f"GET /v1/audit/traces/{trace_id} with the auditor key answered {status}: {redact(body)}")
    raise Failed(f"trace {trace_id} is not (completely) in the trail when its answer arrived: "
                 f"{status} {redact(body)}")


def of_type(events: list[dict], event_type: str) -> list[dict]:
    return [e for e in events if e.get("event_type") == event_type]
