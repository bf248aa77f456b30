"""Output helpers shared by the commands: `--format json` and aligned tables on stdout, and
the one parser of a SECONDS argument."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def add_format_option(parser: argparse.ArgumentParser) -> None:
    """The `--format {table,json}` option every listing command has."""
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="output format (json: an array, or an object for inspect)")


def seconds(text: str) -> float:
    """A SECONDS option's value: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, not {text!r}")
    return value


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Rows as left-aligned columns under an upper-case header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")
