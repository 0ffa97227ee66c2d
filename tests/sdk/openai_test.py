#!/usr/bin/env python3
"""The gateway's OpenAI-compatible facade, driven by the official `openai` Python SDK.

    SDK_BASE_URL=http://127.0.0.1:8000 SDK_ANALYST_KEY=ck_... SDK_AUDITOR_KEY=ck_... \
        SDK_STANDIN_URL=http://127.0.0.1:9300 python3 tests/sdk/openai_test.py

scripts/sdk_test.sh starts a gateway (the example policy: the `assistant` action is a chat model whose
upstream is scripts/upstream_standin.py), makes the keys and runs this. Checked, each printed as it
passes:
  0. the upstream stand-in itself streams as OpenAI does, read by the same SDK (when SDK_STANDIN_URL is
     set): a failure there is the stand-in's, not the gateway's;
  1. GET /v1/models: the analyst's list has `assistant`, the auditor's does not;
  2. a completion: a `chat.completion` of model `assistant`, the client's message answered, usage that
     adds up, an X-Trace-Id header; the upstream got the executor's system prompt first, then the
     client's message, and the client's max_tokens;
  3. the same messages streamed with include_usage: `chat.completion.chunk`s of model `assistant`, the
     content put together from several deltas equal to the completion's, a last chunk with no choices
     and the usage; without include_usage, no usage chunk;
  4. refusals in OpenAI's error shape, so the SDK raises its own exceptions: the auditor's completion
     (and stream) PermissionDeniedError 403 code NO_MATCHING_RULE, under the client's own X-Trace-Id;
     an unknown key AuthenticationError 401 AUTH_INVALID_KEY; no key 401 AUTH_MISSING_KEY;
     max_tokens 5000 UnprocessableEntityError 422 INPUT_SCHEMA_INVALID;
  5. the trail, read back with the auditor key (GET /v1/audit/traces/{trace_id}): the completion and
     the stream each have REQUEST_START on channel "openai", DECISION allow of `assistant`,
     ACTION_EXECUTED success with the usage the client was given, REQUEST_END 200; the refusal has
     DECISION deny NO_MATCHING_RULE and no ACTION_EXECUTED.
The trace ids go to SDK_TRACES_FILE (JSON: completion, stream, refused) when it is set.
Any failure prints `OPENAI SDK TEST FAILED: <what was expected, what came>` and exits 1.

Environment (keys come through the environment, never the command line):
  SDK_BASE_URL      the gateway, e.g. http://127.0.0.1:8000 (the SDK's base_url is this + /v1)
  SDK_ANALYST_KEY   a key of role analyst, context work only
  SDK_AUDITOR_KEY   a key of role auditor, context work only (and the right to read the trail)
  SDK_STANDIN_URL   the upstream stand-in, e.g. http://127.0.0.1:9300 (optional: steps 0 and the
                    upstream checks of 2 and 3 are skipped without it)
  SDK_TRACES_FILE   where to write the trace ids (optional)
  SDK_TIMEOUT_S     per-request timeout (default 60)
"""

from __future__ import annotations

import json
import sys
import traceback
import uuid

import openai

import support
from support import Failed, check, env, field, http_json, of_type, redact, trace_events

support.NAME = NAME = "openai sdk"
TIMEOUT_S = support.TIMEOUT_S
MODEL = "assistant"


def find_usage(node: object, depth: int = 0):
    """The first `usage` object with token counts inside an event, wherever the gateway put it."""
    if depth > 4:
        return None
    if isinstance(node, dict):
        usage = node.get("usage")
        if isinstance(usage, dict) and "prompt_tokens" in usage and "completion_tokens" in usage:
            return usage
        for value in node.values():
            found = find_usage(value, depth + 1)
            if found is not None:
                return found
    elif isinstance(node, list):
        for value in node:
            found = find_usage(value, depth + 1)
            if found is not None:
                return found
    return None


def check_allowed_trace(base: str, auditor_key: str, trace_id: str, what: str, usage) -> None:
    events = trace_events(base, auditor_key, trace_id)
    types = [e.get("event_type") for e in events]
    starts = of_type(events, "REQUEST_START")
    check(len(starts) == 1 and field(starts[0], "channel") == "openai",
          f"{what} trace {trace_id}: one REQUEST_START with channel \"openai\"", starts)
    decisions = of_type(events, "DECISION")
    check(len(decisions) == 1 and field(decisions[0], "effect") == "allow"
          and field(decisions[0], "action") == MODEL,
          f"{what} trace: one DECISION allow of action {MODEL}", decisions)
    executed = of_type(events, "ACTION_EXECUTED")
    check(len(executed) == 1 and str(field(executed[0], "status")).lower() == "success",
          f"{what} trace: one ACTION_EXECUTED with status success", executed)
    audited = find_usage(executed[0])
    check(audited is not None and audited.get("prompt_tokens") == usage.prompt_tokens
          and audited.get("completion_tokens") == usage.completion_tokens,
          f"{what} trace: ACTION_EXECUTED records the usage the client got "
          f"({usage.prompt_tokens} prompt, {usage.completion_tokens} completion tokens)", executed[0])
    ends = of_type(events, "REQUEST_END")
    check(len(ends) == 1 and field(ends[0], "status") == 200,
          f"{what} trace: one REQUEST_END with status 200", ends)
    check(types.index("REQUEST_START") < types.index("DECISION") < types.index("ACTION_EXECUTED")
          < types.index("REQUEST_END"),
          f"{what} trace: REQUEST_START, DECISION, ACTION_EXECUTED, REQUEST_END in chain order", types)


def collect_stream(stream) -> tuple[str, int, list, object, list]:
    """(content, content deltas, finish reasons, usage, chunks) of a chat completion stream."""
    parts: list[str] = []
    finish: list[str] = []
    usage = None
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    return "".join(parts), len(parts), finish, usage, chunks


def usage_adds_up(usage) -> bool:
    return (usage is not None and isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0
            and isinstance(usage.completion_tokens, int) and usage.completion_tokens > 0
            and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens)


def upstream_requests(standin: str) -> list[dict]:
    status, _, hits = http_json("GET", f"{standin}/hits")
    if status != 200 or not isinstance(hits, dict) or not isinstance(hits.get("llm_requests"), list):
        raise Failed(f"GET {standin}/hits gave no llm_requests: {status} {hits}")
    return hits["llm_requests"]


# ---- 0. the stand-in, straight ---------------------------------------------------------------------
def standin_streams_like_openai(standin: str) -> None:
    client = openai.OpenAI(base_url=f"{standin}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
    messages = [{"role": "system", "content": "stand-in check"},
                {"role": "user", "content": "Pregão eletrônico para material de limpeza"}]
    plain = client.chat.completions.create(model="standin", messages=messages)
    text = plain.choices[0].message.content or ""
    content, deltas, finish, usage, chunks = collect_stream(client.chat.completions.create(
        model="standin", messages=messages, stream=True, stream_options={"include_usage": True}))
    check(content == text and deltas >= 3 and finish == ["stop"] and usage_adds_up(usage)
          and chunks[-1].choices == [],
          "the stand-in streams as OpenAI does (straight, no gateway): deltas make the completion's "
          "text, finish_reason stop, a last chunk with no choices and the usage",
          f"{content!r} vs {text!r}, {deltas} deltas, finish {finish}, usage {usage}")


def main() -> int:
    base = env("SDK_BASE_URL").rstrip("/")
    analyst_key = env("SDK_ANALYST_KEY")
    auditor_key = env("SDK_AUDITOR_KEY")
    standin = env("SDK_STANDIN_URL", required=False).rstrip("/")
    traces_file = env("SDK_TRACES_FILE", required=False)
    print(f"{NAME}: openai {openai.__version__} against {base}/v1")

    if standin:
        standin_streams_like_openai(standin)

    # max_retries=0: a refusal is answered once, and the trail holds exactly the requests made here.
    def client(key: str, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S, **kwargs)

    analyst = client(analyst_key)
    auditor = client(auditor_key)

    # ---- 1. models ---------------------------------------------------------------------------------
    models = analyst.models.list()
    ids = [m.id for m in models.data]
    check(MODEL in ids, f"GET /v1/models for the analyst lists {MODEL}", ids)
    for m in models.data:
        check(m.object == "model" and m.owned_by == "catraca" and isinstance(m.created, int),
              f"model {m.id}: object \"model\", owned_by \"catraca\", created an integer", m)
    # The context named in the header the gateway reads gives the same list.
    named = client(analyst_key, default_headers={"X-Catraca-Context": "work"}).models.list()
    check(sorted(m.id for m in named.data) == sorted(ids),
          "the analyst's list with X-Catraca-Context: work is the same", [m.id for m in named.data])
    auditor_ids = [m.id for m in auditor.models.list().data]
    check(MODEL not in auditor_ids, f"GET /v1/models for the auditor does not list {MODEL}", auditor_ids)

    # ---- 2. a completion ---------------------------------------------------------------------------
    nonce = uuid.uuid4().hex[:12]
    messages = [{"role": "user", "content": f"Resuma o pregão eletrônico {nonce} de material de expediente."}]
    raw = analyst.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=64, temperature=0.2)
    completion_trace = raw.headers.get("x-trace-id")
    check(bool(completion_trace), "the completion's response has an X-Trace-Id header", dict(raw.headers))
    completion = raw.parse()
    check(completion.object == "chat.completion" and completion.model == MODEL and bool(completion.id)
          and isinstance(completion.created, int),
          f"the completion is a chat.completion of model {MODEL}, with an id and created",
          completion.model_dump_json())
    text = completion.choices[0].message.content or ""
    check(text.strip() != "" and nonce in text and completion.choices[0].message.role == "assistant",
          "the completion answers the client's message (the stand-in quotes it)", text)
    check(usage_adds_up(completion.usage), "the completion's usage has prompt, completion and total tokens",
          completion.usage)
    print(f"{NAME}: completion {completion_trace}: {text!r}")

    # ---- 3. a stream -------------------------------------------------------------------------------
    raw = analyst.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=64, temperature=0.2,
        stream=True, stream_options={"include_usage": True})
    stream_trace = raw.headers.get("x-trace-id")
    check(bool(stream_trace) and stream_trace != completion_trace,
          "the stream's response has an X-Trace-Id header of its own", dict(raw.headers))
    check(raw.headers.get("content-type", "").startswith("text/event-stream"),
          "the stream is text/event-stream", raw.headers.get("content-type"))
    content, deltas, finish, stream_usage, chunks = collect_stream(raw.parse())
    check(len(chunks) > 0 and all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks),
          f"every streamed chunk is a chat.completion.chunk of model {MODEL}",
          sorted({(c.object, c.model) for c in chunks}))
    check(content == text, "the content put together from the deltas is the completion's",
          f"{content!r} vs {text!r}")
    check(deltas >= 2, "the content came in several deltas (relayed as it was streamed)", deltas)
    check(finish == ["stop"], "one finish_reason, stop", finish)
    check(chunks[-1].choices == [] and usage_adds_up(stream_usage) and chunks[-1].usage == stream_usage,
          "the last chunk has no choices and the usage (include_usage)",
          chunks[-1].model_dump_json() if chunks else "no chunks")
    check(sum(1 for c in chunks if c.usage is not None) == 1, "exactly one chunk carries usage",
          [c.usage for c in chunks])
    print(f"{NAME}: stream {stream_trace}: {len(chunks)} chunks, {deltas} content deltas, usage {stream_usage}")
    _, _, _, _, plain_chunks = collect_stream(analyst.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=64, stream=True))
    check(len(plain_chunks) > 0 and all(c.usage is None and c.choices for c in plain_chunks),
          "a stream without include_usage has no usage chunk", [c.model_dump_json() for c in plain_chunks][-2:])

    if standin:
        sent = [r for r in upstream_requests(standin) if nonce in str(r.get("last", ""))]
        check(len(sent) == 3, "the upstream got three requests with the client's message", sent)
        for r in sent:
            roles = r.get("roles") or []
            check(len(roles) >= 2 and roles[0] == "system" and roles[-1] == "user",
                  f"upstream request (stream={r.get('stream')}): the executor's system prompt first, "
                  "the client's message last", roles)
        check(all(r.get("max_tokens") == 64 for r in sent), "the upstream got the client's max_tokens (64)",
              [r.get("max_tokens") for r in sent])
        check([r.get("stream") for r in sent] == [False, True, True],
              "the upstream was asked to stream exactly when the client was", [r.get("stream") for r in sent])

    # ---- 4. refusals -------------------------------------------------------------------------------
    refused_trace = f"sdk-openai-refused-{nonce}"
    try:
        auditor.chat.completions.create(model=MODEL, messages=messages,
                                        extra_headers={"X-Trace-Id": refused_trace})
        raise Failed("the auditor's completion was answered, 403 NO_MATCHING_RULE expected")
    except openai.PermissionDeniedError as e:
        check(e.status_code == 403 and e.code == "NO_MATCHING_RULE",
              "the auditor's completion: PermissionDeniedError 403, code NO_MATCHING_RULE",
              f"{e.status_code} {e.code} {e.body}")
        check(bool(e.message) and isinstance(e.body, dict) and "type" in e.body and "param" in e.body,
              "the refusal is in OpenAI's error shape (message, type, code, param)", e.body)
        check(e.response.headers.get("x-trace-id") == refused_trace,
              "the refusal carries the client's own X-Trace-Id", e.response.headers.get("x-trace-id"))
    try:
        for _ in auditor.chat.completions.create(model=MODEL, messages=messages, stream=True):
            pass
        raise Failed("the auditor's stream was answered, 403 NO_MATCHING_RULE expected")
    except openai.PermissionDeniedError as e:
        check(e.status_code == 403 and e.code == "NO_MATCHING_RULE",
              "the auditor's stream: refused before any event, PermissionDeniedError 403 NO_MATCHING_RULE",
              f"{e.status_code} {e.code} {e.body}")

    try:
        client("ck_0000000000000000_unknownsecret").chat.completions.create(model=MODEL, messages=messages)
        raise Failed("a completion with an unknown key was answered, 401 expected")
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and e.code == "AUTH_INVALID_KEY",
              "an unknown key: AuthenticationError 401, code AUTH_INVALID_KEY", f"{e.status_code} {e.code} {e.body}")
        check(bool(e.response.headers.get("x-trace-id")), "the 401 has an X-Trace-Id header",
              dict(e.response.headers))
    status, headers, body = http_json("POST", f"{base}/v1/chat/completions", None,
                                      {"model": MODEL, "messages": messages})
    code = body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    check(status == 401 and code == "AUTH_MISSING_KEY" and "www-authenticate" in headers,
          "no key: 401, code AUTH_MISSING_KEY, with WWW-Authenticate", f"{status} {headers} {body}")

    try:
        analyst.chat.completions.create(model=MODEL, messages=messages, max_tokens=5000)
        raise Failed("max_tokens 5000 was answered, 422 INPUT_SCHEMA_INVALID expected")
    except openai.UnprocessableEntityError as e:
        check(e.status_code == 422 and e.code == "INPUT_SCHEMA_INVALID",
              "max_tokens 5000: UnprocessableEntityError 422, code INPUT_SCHEMA_INVALID",
              f"{e.status_code} {e.code} {e.body}")

    # ---- 5. the trail ------------------------------------------------------------------------------
    check_allowed_trace(base, auditor_key, completion_trace, "the completion's", completion.usage)
    check_allowed_trace(base, auditor_key, stream_trace, "the stream's", stream_usage)
    events = trace_events(base, auditor_key, refused_trace)
    starts = of_type(events, "REQUEST_START")
    check(len(starts) == 1 and field(starts[0], "channel") == "openai",
          "the refusal's trace: REQUEST_START with channel \"openai\"", starts)
    decisions = of_type(events, "DECISION")
    check(len(decisions) == 1 and field(decisions[0], "effect") == "deny"
          and "NO_MATCHING_RULE" in (field(decisions[0], "reason_codes") or []),
          "the refusal's trace: DECISION deny with NO_MATCHING_RULE", decisions)
    check(not of_type(events, "ACTION_EXECUTED"), "the refusal's trace: no ACTION_EXECUTED",
          [e.get("event_type") for e in events])
    ends = of_type(events, "REQUEST_END")
    check(len(ends) == 1 and field(ends[0], "status") == 403, "the refusal's trace: REQUEST_END 403", ends)

    if traces_file:
        with open(traces_file, "w", encoding="utf-8") as f:
            json.dump({"completion": completion_trace, "stream": stream_trace, "refused": refused_trace}, f)
    print(f"{NAME}: {support.PASSED} checks passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"OPENAI SDK TEST FAILED: {e}", file=sys.stderr)
    except openai.APIStatusError as e:
        print(f"OPENAI SDK TEST FAILED: unexpected {type(e).__name__} {e.status_code}: "
              f"{redact(e.body)} (X-Trace-Id {e.response.headers.get('x-trace-id')})", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 (any other error fails the test, with its traceback)
        print(redact(traceback.format_exc()), file=sys.stderr)
        print(f"OPENAI SDK TEST FAILED: {type(e).__name__}: {redact(e)}", file=sys.stderr)
    sys.exit(1)
