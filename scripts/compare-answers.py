#!/usr/bin/env python3
"""Compare two `tracer-lab run --save-answers DIR` trees: same files, same JSON shape, and the
same stable vocabulary (verdicts, causes, roles, statuses, interface names, summary and fix
texts with numbers and addresses blanked). Volatile values (times, ids, ports, counters,
latencies) are not compared, only their types.

usage: compare-answers.py BEFORE AFTER    (exit 1 if they differ)
"""
import json
import re
import sys
from pathlib import Path

# Keys whose values are the API's vocabulary: compared (as sets per path), not just typed.
VOCAB = {"verdicts", "cause", "role", "how", "status", "reader", "node_sync", "iface", "name",
         "reason", "side", "dir", "proto", "setting", "source", "tc", "summary", "fix"}
# Numbers, addresses, CIDRs, ports, durations: "10.244.1.10:443 after 150.2 ms" -> "#:# after # ms".
NUMBERS = re.compile(r"[0-9a-f]*:[0-9a-f:]*[0-9a-f]+|\d+(?:\.\d+)*")


def schema(v, into=None):
    """The inferred schema of v: JSON types seen, keys of objects, merged item schema of arrays."""
    s = into if into is not None else {"types": set(), "keys": {}, "items": None}
    if isinstance(v, dict):
        s["types"].add("object")
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
    if a["types"] != b["types"]:
        out.append(f"{path}: types {sorted(a['types'])} != {sorted(b['types'])}")
    for k in sorted(a["keys"].keys() | b["keys"].keys()):
        if k not in b["keys"] or k not in a["keys"]:
            out.append(f"{path}.{k}: key only {'before' if k in a['keys'] else 'after'}")
        else:
            schema_diff(a["keys"][k], b["keys"][k], f"{path}.{k}", out)
    schema_diff(a["items"], b["items"], f"{path}[]", out)


def vocab(v, path="", out=None):
    """{(path, normalised value)} of every vocabulary field; causes are keyed by name."""
    out = set() if out is None else out
    if isinstance(v, dict):
        for k, x in v.items():
            if k in VOCAB and isinstance(x, (str, list)):
                for w in x if isinstance(x, list) else [x]:
                    out.add((f"{path}.{k}", NUMBERS.sub("#", w) if isinstance(w, str) else repr(w)))
            else:
                vocab(x, f"{path}.{k}", out)
    elif isinstance(v, list):
        for x in v:
            key = x.get("cause") if isinstance(x, dict) else None
            vocab(x, f"{path}[{key}]" if key else f"{path}[]", out)
    return out


def compare(before: Path, after: Path):
    files = lambda d: {p.relative_to(d) for p in d.rglob("*.json")}
    fa, fb = files(before), files(after)
    diffs = [f"{f}: only in {before}" for f in sorted(fa - fb)]
    diffs += [f"{f}: only in {after}" for f in sorted(fb - fa)]
    for f in sorted(fa & fb):
        try:
            a, b = (json.loads((d / f).read_text()) for d in (before, after))
        except ValueError as e:
            diffs.append(f"{f}: not JSON ({e})")
            continue
        out = []
        schema_diff(schema(a), schema(b), "$", out)
        va, vb = vocab(a), vocab(b)
        out += [f"{p} = {w!r} only before" for p, w in sorted(va - vb)]
        out += [f"{p} = {w!r} only after" for p, w in sorted(vb - va)]
        diffs += [f"{f}: {d}" for d in out]
    return diffs


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    diffs = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s)" if diffs else "same answers")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
