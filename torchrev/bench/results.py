"""Benchmark results on disk: JSON (everything), CSV (rows), Markdown (the printed table)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any


def write_results(out: Path, tag: str, setup: str, rows: list[dict[str, Any]], table: str) -> None:
    """Write ``out/tag.json``, ``out/tag.csv`` and ``out/tag.md`` and print the table."""
    print("\n" + setup + "\n\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    document = {"setup": setup, "argv": sys.argv[1:], "rows": rows}
    (out / f"{tag}.json").write_text(json.dumps(document, indent=1))
    (out / f"{tag}.md").write_text(setup + "\n\n" + table + "\n")
    with open(out / f"{tag}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
