"""Rendering of result tables for stdout: tabulate formats, CSV/TSV, or one JSON object."""

from __future__ import annotations

import csv
import io
import json
from enum import Enum

from tabulate import tabulate


class Format(str, Enum):
    github = "github"
    plain = "plain"
    csv = "csv"
    tsv = "tsv"
    latex = "latex"
    json = "json"


def render(tables: dict[str, list[dict]], fmt: Format | str) -> str:
    """Render named tables (each a list of row dicts with the same keys).

    json gives one object {name: rows}; csv/tsv give the tables separated by a blank line;
    the others print a title line above each table when there is more than one.
    """
    fmt = Format(fmt)
    if fmt is Format.json:
        return json.dumps(tables, indent=2, default=str)
    out = []
    for name, rows in tables.items():
        if fmt in (Format.csv, Format.tsv):
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [],
                                    delimiter="," if fmt is Format.csv else "\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            out.append(buf.getvalue().rstrip("\n"))
        else:
            title = f"{name}\n\n" if len(tables) > 1 else ""
            out.append(title + tabulate(rows, headers="keys", tablefmt=fmt.value, floatfmt="g"))
    return "\n\n".join(out)
