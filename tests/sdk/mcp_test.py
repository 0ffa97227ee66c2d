#!/usr/bin/env python3
"""The gateway's MCP server (/mcp, Streamable HTTP, stateless), driven by the official `mcp` Python SDK.

    SDK_BASE_URL=http://127.0.0.1:8000 SDK_ANALYST_KEY=ck_... SDK_AUDITOR_KEY=ck_... \
        SDK_ADMIN_KEY=ck_... python3 tests/sdk/mcp_test.py

scripts/sdk_test.sh starts a gateway with the example policy, makes the keys and runs this. Each client
connects the way the SDK does by default (`mcp.Client(url)`: it probes for the newest protocol and
falls back to the initialize handshake), with the key as `Authorization: Bearer` on every request.
Checked, each printed as it passes:
  1. the analyst connects: a protocol version is agreed, the server names itself, and no answer
     carries an Mcp-Session-Id (stateless);
  2. tools/list gives exactly the actions the key may run in its context: the analyst `echo`,
     `licitacoes.summarize`, `assistant`; the auditor `echo` only; the admin (when SDK_ADMIN_KEY is
     set) those of the analyst and `licitacoes.collect`, `licitacoes.digest`; each tool has a
     description and its action's JSON Schema (an object schema) as inputSchema; echo's is the one in
     SDK_POLICIES_DIR/schemas/echo.json;
  3. tools/call of echo: not an error, structuredContent is the executor's result ({"message": ...})
     and the text content is that object's JSON; the trail has its trace (REQUEST_START on channel
     "mcp", DECISION allow of echo, ACTION_EXECUTED success);
  4. tools/call of licitacoes.collect by the analyst: a tool result with isError, its text naming
     NO_MATCHING_RULE and `trace_id <id>`; that trace, read with the auditor key, has REQUEST_START on
     channel "mcp", DECISION deny with NO_MATCHING_RULE, and no ACTION_EXECUTED;
  5. a client with an unknown key cannot connect: every answer it got was HTTP 401; a plain POST
     without a key is 401 too, with WWW-Authenticate.
Any failure prints `MCP SDK TEST FAILED: <what was expected, what came>` and exits 1.

Environment (keys come through the environment, never the command line):
  SDK_BASE_URL      the gateway, e.g. http://127.0.0.1:8000 (the MCP endpoint is this + /mcp)
  SDK_ANALYST_KEY   a key of role analyst, context work only
  SDK_AUDITOR_KEY   a key of role auditor, context work only (and the right to read the trail)
  SDK_ADMIN_KEY     a key of role admin, context work only (optional: its tool list is checked if set)
  SDK_POLICIES_DIR  the gateway's policy folder (default: policies beside tests/)
  SDK_MCP_MODE      the SDK's connect mode: auto (its default) or legacy (initialize only)
  SDK_TIMEOUT_S     per-request timeout (default 60)
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
import uuid
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

import support
from support import Failed, check, env, field, http_json, of_type, redact, trace_events

support.NAME = NAME = "mcp sdk"
TIMEOUT_S = support.TIMEOUT_S
TOTAL_S = 10 * TIMEOUT_S
MODE = os.environ.get("SDK_MCP_MODE", "auto")
ROOT = Path(__file__).resolve().parents[2]

ANALYST_TOOLS = {"echo", "licitacoes.summarize", "assistant"}
AUDITOR_TOOLS = {"echo"}
ADMIN_TOOLS = ANALYST_TOOLS | {"licitacoes.collect", "licitacoes.digest"}
# The payload tests/api and the other scripts send: valid for the action's schema, so only the action
# matrix can refuse it.
COLLECT_ARGS = {"source": "pncp", "endpoint": "publicacao", "data_inicial": "2026-01-01",
                "data_final": "2026-01-02", "modalidade": 6}
TRACE_IN_TEXT = re.compile(r"trace_id\W{0,3}([A-Za-z0-9._-]{8,64})")


class Wire:
    """Every HTTP exchange of one client: the JSON-RPC method it carried and what came back."""

    def __init__(self) -> None:
        self.exchanges: list[dict] = []

    async def on_response(self, response: httpx2.Response) -> None:
        request = response.request
        try:
            body = json.loads(request.content or b"null")
        except Exception:  # noqa: BLE001 (a body not read or not JSON: no method to record)
            body = None
        self.exchanges.append({
            "http": request.method,
            "rpc": body.get("method") if isinstance(body, dict) else None,
            "status": response.status_code,
            "trace_id": response.headers.get("x-trace-id"),
            "session_id": response.headers.get("mcp-session-id"),
            "www_authenticate": response.headers.get("www-authenticate"),
        })

    def of(self, rpc: str) -> list[dict]:
        return [x for x in self.exchanges if x["rpc"] == rpc]


@asynccontextmanager
async def connect(url: str, key: str, wire: Wire):
    """An SDK client on the gateway's /mcp with the key on every request (the SDK's own transport)."""
    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx2.Timeout(TIMEOUT_S),
        event_hooks={"response": [wire.on_response]},
        trust_env=False,
    ) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=MODE, cache=None,
                          read_timeout_seconds=TIMEOUT_S) as client:
            yield client


async def tool_names(client: Client) -> tuple[set, dict]:
    tools: dict = {}
    cursor = None
    for _ in range(20):
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            tools[tool.name] = tool
        cursor = page.next_cursor
        if not cursor:
            break
    return set(tools), tools


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def schema_shape(schema: dict) -> tuple:
    return (schema.get("type"), sorted((schema.get("properties") or {}).keys()), sorted(schema.get("required") or []))


def check_session_wire(wire: Wire, who: str) -> None:
    """Every answer of a session on a good key was 2xx (the discover probe aside), none with a session id."""
    bad = [x for x in wire.exchanges if x["status"] >= 300 and x["rpc"] != "server/discover"]
    check(not bad, f"{who}: every request of the session was answered 2xx", bad)
    sessions = [x for x in wire.exchanges if x["session_id"]]
    check(not sessions, f"{who}: no answer carries an Mcp-Session-Id (stateless)", sessions)


async def run() -> int:
    base = env("SDK_BASE_URL").rstrip("/")
    analyst_key = env("SDK_ANALYST_KEY")
    auditor_key = env("SDK_AUDITOR_KEY")
    admin_key = env("SDK_ADMIN_KEY", required=False)
    policies = Path(env("SDK_POLICIES_DIR", required=False) or ROOT / "policies")
    url = f"{base}/mcp"
    print(f"{NAME}: mcp {version('mcp')} against {url} (connect mode {MODE})")

    # ---- 1 to 4: the analyst -----------------------------------------------------------------------
    wire = Wire()
    async with connect(url, analyst_key, wire) as analyst:
        session = analyst.session
        agreed = analyst.protocol_version
        server = analyst.server_info
        how = "initialize" if session.initialize_result is not None else "discover"
        check(bool(agreed), f"the analyst connected ({how}): protocol {agreed}, server "
              f"{server.name if server else '?'} {server.version if server else ''}", agreed)
        if how == "initialize":
            check(bool(server and server.name), "the initialize result names the server", server)
            check(analyst.server_capabilities.tools is not None, "the server declares the tools capability",
                  analyst.server_capabilities)

        names, tools = await tool_names(analyst)
        check(names == ANALYST_TOOLS, f"tools/list for the analyst is exactly {sorted(ANALYST_TOOLS)}", sorted(names))
        for name, tool in sorted(tools.items()):
            check(bool(tool.description) and isinstance(tool.input_schema, dict)
                  and tool.input_schema.get("type") == "object",
                  f"tool {name}: a description and an object inputSchema", tool.model_dump(by_alias=True))
        echo_file = policies / "schemas" / "echo.json"
        if echo_file.is_file():
            want = json.loads(echo_file.read_text())
            check(schema_shape(tools["echo"].input_schema) == schema_shape(want),
                  f"echo's inputSchema is the action's schema ({echo_file.name}: type, properties, required)",
                  tools["echo"].input_schema)

        message = f"olá pelo MCP {uuid.uuid4().hex[:8]}"
        calls_before = len(wire.of("tools/call"))
        result = await analyst.call_tool("echo", {"message": message})
        check(not result.is_error, "tools/call echo is not an error", result.model_dump(by_alias=True))
        check(result.structured_content == {"message": message},
              "echo's structuredContent is the executor's result, the message sent", result.structured_content)
        text = text_of(result)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        check(parsed == result.structured_content, "echo's text content is the JSON of that result", text)
        echo_calls = wire.of("tools/call")[calls_before:]
        echo_trace = echo_calls[-1]["trace_id"] if echo_calls else None
        check(bool(echo_trace), "the answer to tools/call has an X-Trace-Id header", echo_calls)

        collect = await analyst.call_tool("licitacoes.collect", COLLECT_ARGS)
        refusal = text_of(collect)
        check(collect.is_error, "tools/call licitacoes.collect by the analyst: a tool result with isError",
              collect.model_dump(by_alias=True))
        check("NO_MATCHING_RULE" in refusal, "the refusal's text names NO_MATCHING_RULE", refusal)
        found = TRACE_IN_TEXT.search(refusal)
        check(found is not None, "the refusal's text names its trace_id", refusal)
        refused_trace = found.group(1)
        header_trace = wire.of("tools/call")[-1]["trace_id"]
        check(header_trace == refused_trace,
              "the refusal's trace id is its HTTP answer's X-Trace-Id", (refused_trace, header_trace))
        print(f"{NAME}: echo trace {echo_trace}; refused trace {refused_trace}: {refusal!r}")
    check_session_wire(wire, "the analyst")

    events = trace_events(base, auditor_key, echo_trace)
    starts = of_type(events, "REQUEST_START")
    check(len(starts) == 1 and field(starts[0], "channel") == "mcp",
          "echo's trace: REQUEST_START with channel \"mcp\"", starts)
    decisions = of_type(events, "DECISION")
    check(len(decisions) == 1 and field(decisions[0], "effect") == "allow" and field(decisions[0], "action") == "echo",
          "echo's trace: DECISION allow of echo", decisions)
    executed = of_type(events, "ACTION_EXECUTED")
    check(len(executed) == 1 and str(field(executed[0], "status")).lower() == "success",
          "echo's trace: ACTION_EXECUTED success", executed)

    events = trace_events(base, auditor_key, refused_trace)
    starts = of_type(events, "REQUEST_START")
    check(len(starts) == 1 and field(starts[0], "channel") == "mcp",
          "the refusal's trace: REQUEST_START with channel \"mcp\"", starts)
    decisions = of_type(events, "DECISION")
    check(len(decisions) == 1 and field(decisions[0], "effect") == "deny"
          and "NO_MATCHING_RULE" in (field(decisions[0], "reason_codes") or [])
          and field(decisions[0], "action") in ("licitacoes.collect", None),
          "the refusal's trace: DECISION deny with NO_MATCHING_RULE", decisions)
    check(not of_type(events, "ACTION_EXECUTED"), "the refusal's trace: no ACTION_EXECUTED",
          [e.get("event_type") for e in events])

    # ---- 2 for the auditor and the admin -----------------------------------------------------------
    wire = Wire()
    async with connect(url, auditor_key, wire) as auditor:
        names, _ = await tool_names(auditor)
        check(names == AUDITOR_TOOLS, f"tools/list for the auditor is exactly {sorted(AUDITOR_TOOLS)}", sorted(names))
    check_session_wire(wire, "the auditor")
    if admin_key:
        wire = Wire()
        async with connect(url, admin_key, wire) as admin:
            names, _ = await tool_names(admin)
            check(names == ADMIN_TOOLS, f"tools/list for the admin is exactly {sorted(ADMIN_TOOLS)}", sorted(names))
        check_session_wire(wire, "the admin")

    # ---- 5. no valid key, no MCP -------------------------------------------------------------------
    wire = Wire()
    error = None
    try:
        async with connect(url, "ck_0000000000000000_unknownsecret", wire) as stranger:
            await stranger.list_tools()
    except Exception as e:  # noqa: BLE001 (whatever the SDK raises for it; what matters is below)
        error = e
    check(error is not None, "a client with an unknown key cannot connect", wire.exchanges)
    check(len(wire.exchanges) > 0 and all(x["status"] == 401 for x in wire.exchanges),
          f"every request of that client was answered HTTP 401 (the SDK raised {type(error).__name__})",
          wire.exchanges)
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "sdk-test", "version": "1"}}}
    status, headers, body = http_json("POST", url, None, initialize,
                                      {"Accept": "application/json, text/event-stream"})
    check(status == 401 and "www-authenticate" in headers,
          "initialize without a key: HTTP 401 with WWW-Authenticate", f"{status} {headers} {body}")

    print(f"{NAME}: {support.PASSED} checks passed")
    return 0


async def bounded() -> int:
    # One bound for the whole run (each request has its own, SDK_TIMEOUT_S): nothing here hangs CI.
    with anyio.fail_after(TOTAL_S):
        return await run()


def failure_in(error: BaseException) -> Failed | None:
    """The Failed inside an error, which the SDK's task groups may have wrapped in exception groups."""
    if isinstance(error, Failed):
        return error
    for inner in getattr(error, "exceptions", ()):
        found = failure_in(inner)
        if found is not None:
            return found
    return None


def leaves(error: BaseException) -> list[BaseException]:
    """The errors inside exception groups, for a one-line summary."""
    inner = getattr(error, "exceptions", None)
    return [leaf for e in inner for leaf in leaves(e)] if inner else [error]


def main() -> int:
    try:
        return anyio.run(bounded)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 (any error fails the test; an unexpected one with its traceback)
        failed = failure_in(e)
        if failed is None:
            print(redact("".join(traceback.format_exception(e))), file=sys.stderr)
            what = "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves(e))
            print(f"MCP SDK TEST FAILED: {redact(what)}", file=sys.stderr)
        else:
            print(f"MCP SDK TEST FAILED: {failed}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
