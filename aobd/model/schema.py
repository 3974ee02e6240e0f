"""Export the workflow document's JSON Schema from the msgspec Structs: ``python -m aobd.model.schema``.

Writes ``docs/workflow.schema.json`` (or the path given). A unit test keeps the committed file current.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec
import orjson

from aobd.model.workflow import CONFIG_TYPES, Workflow


def workflow_schema() -> dict[str, Any]:
    schema: dict[str, Any] = msgspec.json.schema(Workflow)
    # Per-type node configs are validated by type at load time; publish them too, for editors and docs.
    _, defs = msgspec.json.schema_components(list(CONFIG_TYPES.values()))
    schema.setdefault("$defs", {}).update(defs)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "aobd workflow document"
    return schema


def render() -> bytes:
    return orjson.dumps(workflow_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else Path(__file__).resolve().parents[2] / "docs" / "workflow.schema.json"
    target.write_bytes(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
