#!/usr/bin/env python3
"""Compare two `tracer-lab run --save-answers DIR` trees: same files, same JSON shape, and the
same strings and booleans (verdicts, causes, roles, statuses, interface names, evidence; summary
and fix texts with numbers and addresses blanked). Volatile values (times, ids, ports, counters,
latencies) are not compared, only their types. Flows are matched by tuple (a healthy flow that
only one run caught is timing: noted, not compared), causes by name.

usage: compare-answers.py BEFORE AFTER    (exit 1 if they differ)
"""
import json
import re
import sys
from pathlib import Path

# Every string and boolean is compared (verdicts, causes, roles, how, status, interface names,
# addresses, evidence), as a set per path, except these; numbers are compared by type only
# (ids, ports, counters, latencies).
VOLATILE = {"first_seen", "last_seen", "heartbeat"}
TEXT = {"summary", "fix"}
HEALTHY = {"replied", "encapsulated", "snat_applied", "snat_excluded"}
NUMBERS = re.compile(r"(?<![\w-])(?:[0-9a-f]*:[0-9a-f:]+|\d+(?:\.\d+)*)")


def schema(v, into=None):
    """The inferred schema of v: JSON types seen, keys of objects (and their orders: the bytes
    follow them), merged item schema of arrays."""
    s = into if into is not None else {"types": set(), "keys": {}, "orders": set(), "items": None}
    if isinstance(v, dict):
        s["types"].add("object")
        s["orders"].add(tuple(v))
        for k, x in v.items():
            s["keys"][k] = schema(x, s["keys"].get(k))
    elif isinstance(v, list):
        s["types"].add("array")
        for x in v:
            s["items"] = schema(x, s["items"])
    else:
        s["types"].add({bool: "bool", int: "int", float: "float", str: "string"}.get(type(v), "null"))
    return s


def schema_diff(a, b, path, out):
    if a is None or b is None:
        if (a is None) != (b is None):
            out.append(f"{path}[]: items only on the {'after' if a is None else 'before'} side")
        return
    # A null next to values is timing (a flow not judged yet): only the non-null types count.
    ta, tb = (t["types"] - {"null"} or t["types"] for t in (a, b))
    if ta != tb:
        out.append(f"{path}: types {sorted(a['types'])} != {sorted(b['types'])}")
    for k in sorted(a["keys"].keys() | b["keys"].keys()):
        if k not in b["keys"] or k not in a["keys"]:
            out.append(f"{path}.{k}: key only {'before' if k in a['keys'] else 'after'}")
        else:
            schema_diff(a["keys"][k], b["keys"][k], f"{path}.{k}", out)
    if a["keys"].keys() == b["keys"].keys() and a["orders"] != b["orders"]:
        out.append(f"{path}: key order {sorted(a['orders'] - b['orders'])} became "
                   f"{sorted(b['orders'] - a['orders'])}")
    schema_diff(a["items"], b["items"], f"{path}[]", out)


def label(x):
    """How an array element is told apart across runs: a cause by name, a flow by its tuple
    (less the ephemeral source port)."""
    if not isinstance(x, dict):
        return ""
    if "cause" in x:
        return x["cause"]
    if "verdicts" in x:
        return f"{x.get('proto')} {x.get('src')}->{x.get('dst')}:{x.get('dport')}"
    return ""


def vocab(v, path="", out=None):
    """{(path, normalised value)} of every string and boolean, array elements labelled."""
    out = set() if out is None else out
    if isinstance(v, dict):
        for k, x in v.items():
            if k in VOLATILE:
                continue
            if isinstance(x, str):
                out.add((f"{path}.{k}", NUMBERS.sub("#", x) if k in TEXT else x))
            elif isinstance(x, bool):
                out.add((f"{path}.{k}", str(x).lower()))
            else:
                vocab(x, f"{path}.{k}", out)
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, str):
                out.add((f"{path}[]", x))
            else:
                vocab(x, f"{path}[{label(x)}]", out)
    return out


def align_flows(a, b, notes):
    """Keeps the flows whose tuple both answers have. A healthy flow on one side only is timing
    (BGP connected before the agent attached, an IGMP report as an interface came up): noted.
    A faulty one is what the scenario is about: returned as a difference."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return []
    fa, fb = ({label(f) for f in d.get("flows", [])} for d in (a, b))
    diffs = []
    for d, side, other in ((a, "before", fb), (b, "after", fa)):
        for f in [f for f in d.get("flows", []) if label(f) not in other]:
            faulty = f.get("diagnosis") or set(f.get("verdicts", [])) - HEALTHY
            what = f"flow {label(f)} {f.get('verdicts')} only {side}"
            (diffs if faulty else notes).append(what)
        if "flows" in d:
            d["flows"] = [f for f in d["flows"] if label(f) in other]
    return sorted(set(diffs))


def compare(before: Path, after: Path):
    files = lambda d: {p.relative_to(d) for p in d.rglob("*.json")}
    fa, fb = files(before), files(after)
    diffs = [f"{f}: only in {before}" for f in sorted(fa - fb)]
    diffs += [f"{f}: only in {after}" for f in sorted(fb - fa)]
    notes = []
    for f in sorted(fa & fb):
        try:
            a, b = (json.loads((d / f).read_text()) for d in (before, after))
        except ValueError as e:
            diffs.append(f"{f}: not JSON ({e})")
            continue
        timing = []
        out = align_flows(a, b, timing)
        notes += [f"{f}: {n}" for n in sorted(set(timing))]
        schema_diff(schema(a), schema(b), "$", out)
        va, vb = vocab(a), vocab(b)
        out += [f"{p} = {w!r} only before" for p, w in sorted(va - vb)]
        out += [f"{p} = {w!r} only after" for p, w in sorted(vb - va)]
        diffs += [f"{f}: {d}" for d in out]
    return diffs, notes


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    diffs, notes = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    for n in notes:
        print(f"note (timing, not compared): {n}")
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s)" if diffs else "same answers")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
