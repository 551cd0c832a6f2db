#!/usr/bin/env python3
"""docs/openapi.yaml is the API's contract: every answer pinned in tracer/tests/golden/ (written by
the agent's own rendering code, one per verdict and cause) must validate against the schema its
endpoint declares, and in strict mode: an object may hold only the properties the schema lists,
so a field the server adds without documenting it fails here.

Usage: check-openapi.py [OPENAPI] [GOLDEN_DIR]    (run by tests/contract.rs)
"""
import json
import pathlib
import sys

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Golden file name -> the schema its endpoint declares (see the paths in openapi.yaml).
SCHEMA_OF = [
    (".flows.json", "FlowList"),
    (".flow.json", "Flow"),
    (".diagnoses.json", "Diagnoses"),
    ("healthz", "Health"),
    ("readyz", "Readiness"),
]


def strict(node):
    """OpenAPI 3.0 to JSON Schema, strict: `nullable` becomes a null alternative, and objects
    that list properties take no others unless they say so."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items() if k not in ("example", "nullable")}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def main():
    spec_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/openapi.yaml"
    golden = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "tracer/tests/golden"
    spec = yaml.safe_load(spec_path.read_text())
    schemas = strict(spec["components"]["schemas"])
    # $refs point at "#/components/schemas/X": resolve them in a document of that shape.
    root = {"components": {"schemas": schemas}}
    failures = 0
    files = sorted(golden.glob("*.json"))
    if not files:
        print(f"no golden answers in {golden}", file=sys.stderr)
        return 1
    for f in files:
        name = next((s for suffix, s in SCHEMA_OF if suffix in f.name), None)
        if name is None:
            print(f"{f.name}: no schema is known for this answer", file=sys.stderr)
            failures += 1
            continue
        schema = dict(schemas[name], components=root["components"])
        validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
        for e in sorted(validator.iter_errors(json.loads(f.read_text())), key=str):
            path = "/".join(str(p) for p in e.absolute_path)
            print(f"{f.name}: {name} at /{path}: {e.message}", file=sys.stderr)
            failures += 1
    print(f"{len(files)} golden answers checked against {spec_path.name}: {failures} violations")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
