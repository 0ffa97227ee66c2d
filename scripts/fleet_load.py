#!/usr/bin/env python3
"""Load and checks for scripts/fleet_test.sh (standard library only).

    fleet_load.py load --target URL[,URL...] --key KEY --prefix P --clients N --seconds S --out FILE
        [--action A] [--context C]
  Sends POST /process continuously from N clients (one keep-alive connection each, a new one after an
  error) for S seconds; client i sends to target i mod len(targets). Writes one JSON object per request:
  trace, target, outcome (the status, or "error:<what>" without a response), started and ended (wall
  clock), the first reason code of a refusal, the policy revision of an ActionResult.

  fleet_load.py quota|revocation|policy|kill ...   checks one phase's record against the exported trail
  (see each function); exit 1 with the reasons when a check fails.
"""
import argparse
import collections
import http.client
import json
import sys
import threading
import time
import urllib.parse

ALLOWED_STORY = ["REQUEST_START", "DECISION", "EXECUTOR_SELECTED", "ACTION_EXECUTED", "REQUEST_END"]
REFUSED_STORY = ["REQUEST_START", "DECISION", "REQUEST_END"]


def load(args):
    targets = [urllib.parse.urlsplit(t) for t in args.target.split(",")]
    body = json.dumps({"action": args.action, "context_id": args.context, "payload": {"message": "fleet"}})
    deadline = time.time() + args.seconds
    lock, rows = threading.Lock(), []

    def client(n):
        target, conn, i = targets[n % len(targets)], None, 0
        while time.time() < deadline:
            trace = f"{args.prefix}-{n:02d}-{i:06d}"
            i += 1
            row = {"trace": trace, "target": target.netloc, "started": time.time()}
            try:
                conn = conn or http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                conn.request("POST", "/process", body, {
                    "X-API-Key": args.key, "X-Trace-Id": trace, "Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
                row["outcome"] = str(resp.status)
                try:
                    answer = json.loads(raw)
                except ValueError:
                    answer = {}
                if resp.status == 200:
                    row["policy_revision"] = answer.get("policy_revision")
                elif answer.get("reason_codes"):
                    row["reason"] = answer["reason_codes"][0]
                if resp.status == 429:
                    row["retry_after"] = resp.getheader("Retry-After")
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # no response: the record says what happened instead
                row["outcome"] = f"error:{type(e).__name__}"
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
            row["ended"] = time.time()
            with lock:
                rows.append(row)
            if args.pause:
                time.sleep(args.pause)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        for row in sorted(rows, key=lambda r: r["started"]):
            f.write(json.dumps(row) + "\n")
    counts = collections.Counter(r["outcome"] for r in rows)
    print(f"  {args.prefix}: {len(rows)} requests in {args.seconds:g} s from {args.clients} clients: "
          f"{dict(sorted(counts.items()))}")


def read_rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def read_trail(path):
    """The exported trail: events by trace id (in chain order), and every event in file order."""
    by_trace, every = collections.defaultdict(list), []
    for line in open(path):
        if line.strip():
            e = json.loads(line)
            every.append(e)
            if e.get("trace_id"):
                by_trace[e["trace_id"]].append(e)
    for events in by_trace.values():
        events.sort(key=lambda e: (e["chain_id"], e["seq"]))
    return by_trace, every


def story_problems(rows, by_trace):
    """Answered requests whose events are not exactly their story, ending with the status the client saw."""
    bad = []
    for r in rows:
        if r["outcome"].startswith("error:"):
            continue
        status = int(r["outcome"])
        events = by_trace.get(r["trace"], [])
        types = [e["event_type"] for e in events]
        want = ALLOWED_STORY if status == 200 else REFUSED_STORY
        if types != want or events[-1].get("status") != status:
            bad.append((r["trace"], status, types))
    return bad


def decision(by_trace, trace):
    return next((e for e in by_trace.get(trace, []) if e["event_type"] == "DECISION"), None)


def finish(problems, ok_line):
    for p in problems:
        print(f"  FAILED: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"  {ok_line}")


def quota(args):
    """One key's quota held across the fleet: the 200s in the window are at most burst + rate x elapsed
    (+1 for the window's edges) and, the load never pausing, not fewer than that less 2; they came from
    more than one instance; every 429 is RATE_LIMITED with a Retry-After."""
    rows = read_rows(args.record)
    by_trace, _ = read_trail(args.trail)
    answered = [r for r in rows if not r["outcome"].startswith("error:")]
    allowed = [r for r in answered if r["outcome"] == "200"]
    limited = [r for r in answered if r["outcome"] == "429"]
    problems = []
    if not rows:
        finish(["no request was sent"], "")
    elapsed = max(r["started"] for r in rows) - min(r["started"] for r in rows)
    most = args.burst + args.per_second * elapsed + 1
    least = args.burst + args.per_second * elapsed - 2
    instances = collections.Counter(
        decision(by_trace, r["trace"])["instance_id"] for r in allowed if decision(by_trace, r["trace"]))
    print(f"  quota: {len(allowed)} allowed and {len(limited)} limited of {len(rows)} requests in "
          f"{elapsed:.2f} s (tier: burst {args.burst}, {args.per_second}/s: at most {most:.1f}); "
          f"allowed by instance: {dict(sorted(instances.items()))}")
    if len(allowed) > most:
        problems.append(f"the fleet allowed {len(allowed)}, more than the quota's {most:.1f}")
    if len(allowed) < least:
        problems.append(f"the fleet allowed {len(allowed)}, fewer than the quota's {least:.1f}: it limits too early")
    if len(instances) < 2:
        problems.append(f"the allowed requests came from {len(instances)} instance(s): the balancer did not spread them")
    if not limited:
        problems.append("no request was limited: the load did not reach the quota")
    wrong = [r for r in answered if r["outcome"] not in ("200", "429")]
    if wrong:
        problems.append(f"{len(wrong)} answers neither 200 nor 429, e.g. {wrong[0]}")
    unlabelled = [r for r in limited if r.get("reason") != "RATE_LIMITED" or not r.get("retry_after")]
    if unlabelled:
        problems.append(f"{len(unlabelled)} 429s without RATE_LIMITED and Retry-After, e.g. {unlabelled[0]}")
    if len(answered) != len(rows):
        problems.append(f"{len(rows) - len(answered)} requests got no response")
    problems += [f"story: {b}" for b in story_problems(rows, by_trace)[:5]]
    finish(problems, "quota held across the fleet")


def revocation(args):
    """A key revoked through one instance is refused by every instance within the bound: no request to any
    instance that started later than bound after the revocation was acknowledged is allowed, and each
    instance refuses it with AUTH_KEY_REVOKED."""
    rows = read_rows(args.record)
    by_trace, _ = read_trail(args.trail)
    acked, bound = args.acknowledged, args.bound_ms / 1000
    problems = []
    for target in sorted({r["target"] for r in rows}):
        mine = [r for r in rows if r["target"] == target and not r["outcome"].startswith("error:")]
        before = [r for r in mine if r["ended"] < args.sent]
        late = [r for r in mine if r["started"] > acked + bound and r["outcome"] == "200"]
        refused = [r for r in mine if r["outcome"] == "401"]
        first_refusal = min((r["ended"] for r in refused), default=None)
        took = f"{(first_refusal - args.sent) * 1000:.0f} ms after the revocation was sent" if first_refusal else "never"
        print(f"  revocation: {target}: {len(before)} allowed before, first refusal {took}, "
              f"{len(late)} allowed past the bound")
        if not before or any(r["outcome"] != "200" for r in before):
            problems.append(f"{target}: the key was not allowed before its revocation")
        if late:
            problems.append(f"{target}: {len(late)} requests allowed more than {args.bound_ms} ms after the revocation, e.g. {late[0]}")
        if not refused or any(r.get("reason") != "AUTH_KEY_REVOKED" for r in refused):
            problems.append(f"{target}: the revoked key was not refused with AUTH_KEY_REVOKED")
        wrong = [r for r in mine if r["outcome"] not in ("200", "401")]
        if wrong:
            problems.append(f"{target}: {len(wrong)} answers neither 200 nor 401, e.g. {wrong[0]}")
    problems += [f"story: {b}" for b in story_problems(rows, by_trace)[:5]]
    finish(problems, f"the revoked key was refused by every instance within {args.bound_ms} ms")


def policy(args):
    """A policy change reached every instance, and no request was decided by a mix of revisions: each
    answer agrees with the revision its DECISION names (old: allowed, and the ActionResult names the same
    revision; new: refused by the new rule), both revisions decided some requests, and every request
    started after all instances reported the new revision was decided by it."""
    rows = read_rows(args.record)
    by_trace, every = read_trail(args.trail)
    problems, seen = [], collections.Counter()
    for r in rows:
        if r["outcome"].startswith("error:"):
            problems.append(f"no response: {r}")
            continue
        d = decision(by_trace, r["trace"])
        if d is None:
            problems.append(f"no DECISION for {r['trace']}")
            continue
        revision, status = d.get("policy_revision"), int(r["outcome"])
        seen[(revision, status)] += 1
        if revision == args.old:
            if status != 200 or r.get("policy_revision") != args.old:
                problems.append(f"decided by the old revision but answered {status} naming {r.get('policy_revision')}: {r['trace']}")
        elif revision == args.new:
            if status != 403 or r.get("reason") != args.reason:
                problems.append(f"decided by the new revision but answered {status} {r.get('reason')}: {r['trace']}")
            if d.get("effect") != "DENY" and d.get("effect") != "deny":
                problems.append(f"decided by the new revision with effect {d.get('effect')}: {r['trace']}")
        else:
            problems.append(f"decided by an unknown revision {revision}: {r['trace']}")
        if r["started"] > args.all_new and revision != args.new:
            problems.append(f"started after every instance reported the new revision, decided by {revision}: {r['trace']}")
    print(f"  policy: decisions by (revision, status): "
          f"{ {(rev[:12] if rev else rev, st): n for (rev, st), n in sorted(seen.items(), key=str)} }")
    if not any(rev == args.old for rev, _ in seen) or not any(rev == args.new for rev, _ in seen):
        problems.append("the load did not span the change (one revision decided every request)")
    loaded = collections.Counter(
        e["instance_id"] for e in every
        if e["event_type"] == "POLICY_LOADED" and e.get("policy_revision") == args.new and e.get("trigger") == "request")
    print(f"  policy: POLICY_LOADED of the new revision (trigger request) by instance: {dict(sorted(loaded.items()))}")
    if len(loaded) != args.instances:
        problems.append(f"{len(loaded)} instances recorded loading the new revision, not {args.instances}")
    problems += [f"story: {b}" for b in story_problems(rows, by_trace)[:5]]
    finish(problems, "every instance moved to the new revision; no request decided by a mix of the two")


def kill(args):
    """One instance killed mid-load: every answered request has its full story; the requests without a
    200 were in flight at the kill (at most two per client: one the kill cut, and one the balancer had
    already sent on a connection to the killed instance before it saw the connection close, within
    `grace` seconds of the kill); the instance restarted with a new chain whose CHAIN_OPENED names its
    old chain's last event; every instance answered after the restart."""
    rows = read_rows(args.record)
    by_trace, every = read_trail(args.trail)
    problems = []
    answered = [r for r in rows if not r["outcome"].startswith("error:")]
    statuses = collections.Counter(r["outcome"] for r in rows)
    cut = [r for r in rows if r["outcome"] != "200"]
    in_flight = [r for r in cut if r["started"] < args.killed_to + args.grace and r["ended"] >= args.killed_from]
    late = [r for r in cut if r not in in_flight]
    print(f"  kill: {len(rows)} requests, {dict(sorted(statuses.items()))}; {len(in_flight)} in flight at the "
          f"kill without a 200, {len(late)} failed later")
    if late:
        problems.append(f"{len(late)} requests failed after the kill: the balancer did not route around it, e.g. {late[0]}")
    if len(in_flight) > 2 * args.clients:
        problems.append(f"{len(in_flight)} requests cut by the kill, more than two per client ({args.clients} clients)")
    problems += [f"story: {b}" for b in story_problems(answered, by_trace)[:5]]
    opened = [e for e in every if e["event_type"] == "CHAIN_OPENED" and e["instance_id"] == args.instance]
    if len(opened) != 2:
        problems.append(f"{len(opened)} chains opened by {args.instance}, not 2 (before and after the kill)")
    else:
        first, second = sorted(opened, key=lambda e: e["occurred_at"])
        old_events = [e for e in every if e["chain_id"] == first["chain_id"]]
        tail = max(old_events, key=lambda e: e["seq"])
        claim = (second.get("previous_chain_id"), second.get("previous_seq"), second.get("previous_hash"))
        print(f"  kill: {args.instance} reopened as {second['chain_id']}, linked to {claim[0]} seq {claim[1]}")
        if claim != (first["chain_id"], tail["seq"], tail["hash"]):
            problems.append(f"the new chain names {claim}, not the old chain's last event "
                            f"{(first['chain_id'], tail['seq'], tail['hash'])}")
    after = collections.Counter(
        e["instance_id"] for r in answered if r["started"] > args.restarted
        for e in by_trace.get(r["trace"], []) if e["event_type"] == "DECISION")
    print(f"  kill: decisions after the restart by instance: {dict(sorted(after.items()))}")
    if args.instance not in after:
        problems.append(f"{args.instance} decided nothing after its restart")
    finish(problems, "the fleet routed around the killed instance and every answered request is audited")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("load")
    a.add_argument("--target", required=True)
    a.add_argument("--key", required=True)
    a.add_argument("--prefix", required=True)
    a.add_argument("--clients", type=int, default=4)
    a.add_argument("--seconds", type=float, default=3)
    a.add_argument("--pause", type=float, default=0, help="seconds each client waits between requests")
    a.add_argument("--action", default="echo")
    a.add_argument("--context", default="work")
    a.add_argument("--out", required=True)
    for name in ("quota", "revocation", "policy", "kill"):
        c = sub.add_parser(name)
        c.add_argument("--record", required=True)
        c.add_argument("--trail", required=True)
    sub.choices["quota"].add_argument("--burst", type=int, required=True)
    sub.choices["quota"].add_argument("--per-second", type=float, required=True)
    sub.choices["revocation"].add_argument("--sent", type=float, required=True)
    sub.choices["revocation"].add_argument("--acknowledged", type=float, required=True)
    sub.choices["revocation"].add_argument("--bound-ms", type=float, required=True)
    sub.choices["policy"].add_argument("--old", required=True)
    sub.choices["policy"].add_argument("--new", required=True)
    sub.choices["policy"].add_argument("--reason", required=True)
    sub.choices["policy"].add_argument("--all-new", type=float, required=True)
    sub.choices["policy"].add_argument("--instances", type=int, required=True)
    k = sub.choices["kill"]
    k.add_argument("--instance", required=True)
    k.add_argument("--clients", type=int, required=True)
    k.add_argument("--killed-from", type=float, required=True)
    k.add_argument("--killed-to", type=float, required=True)
    k.add_argument("--restarted", type=float, required=True)
    k.add_argument("--grace", type=float, default=0.2, help="seconds after the kill a request may still be cut")
    args = p.parse_args()
    {"load": load, "quota": quota, "revocation": revocation, "policy": policy, "kill": kill}[args.command](args)


if __name__ == "__main__":
    main()
