"""The run-config table of docs/configuration.md, generated from ``RunConfig`` (each key's default, allowed
values and help, said once).

    python scripts/config_table.py          # print the table
    python scripts/config_table.py --write  # replace the table in docs/configuration.md

``tests/test_config.py`` checks that docs/configuration.md holds exactly this table. The table is found by its
header row (``HEADER``) and ends at the first line that is not a table row.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from safedlora_app.core.config import RunConfig, allowed

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = "| key | default | allowed | meaning |\n|---|---|---|---|\n"


def cell(text: str) -> str:
    """reStructuredText literals as Markdown code; pipes escaped for the table."""
    return text.replace("``", "`").replace("|", "\\|")


def table() -> str:
    rows = []
    for f in dataclasses.fields(RunConfig):
        default = json.dumps(f.default) if isinstance(f.default, (str, bool)) else repr(f.default)  # as in TOML
        key = f.name.replace("_", "-")
        rows.append(f"| `{key}` | `{default}` | {cell(allowed(f))} | {cell(f.metadata['help'])} |\n")
    return HEADER + "".join(rows)


def doc_table(text: str) -> str:
    """The run-config table as it stands in the page (header to the first line that is not a row)."""
    start = text.index(HEADER)
    end = start + len(HEADER)
    while text.startswith("|", end):
        end = text.index("\n", end) + 1
    return text[start:end]


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        text = DOC.read_text()
        DOC.write_text(text.replace(doc_table(text), table()))
    else:
        sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
