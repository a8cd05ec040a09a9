"""Rendering of result tables for stdout: tabulate formats, CSV/TSV, or one JSON object."""

from __future__ import annotations

import csv
import io
import json
from enum import Enum

from tabulate import tabulate

from .errors import UnivError


class Format(str, Enum):
    github = "github"
    plain = "plain"
    csv = "csv"
    tsv = "tsv"
    latex = "latex"
    json = "json"


def render(tables: dict[str, list[dict]], fmt: Format | str, table: str | None = None) -> str:
    """Render named tables (each a list of row dicts with the same keys).

    ``table`` keeps one of them (a unique prefix of its name will do). json gives one object
    {name: rows}; csv and tsv hold one table, so that a CSV reader can load them (several ask for
    --table); the others print a title line above each table when there is more than one.
    """
    fmt = Format(fmt)
    _names = list(tables)
    if table is not None:
        tables = {name: rows for name, rows in tables.items() if name == table} or \
                 {name: rows for name, rows in tables.items() if name.startswith(table)}
        if len(tables) != 1:
            raise UnivError(f"--table {table!r} names none of the tables (or several); they are: {', '.join(_names)}")
    if fmt in (Format.csv, Format.tsv) and len(tables) > 1:
        raise UnivError(f"{fmt.value} holds one table: choose one with --table ({', '.join(tables)})")
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
