"""Merge several bench.json files into one Markdown table: one row per case and fraction, one column per system.

Each cell is "ms (efficiency), peak GiB". Used to write BENCHMARKS.md from the runs of one session::

    python benchmarks/summarize.py benchmarks/results/2026-11-23/*.json
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

from tabulate import tabulate


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [row for row in json.loads(path.read_text())["results"] if row.get("status") == "ok"]
    return rows


def cell(row: dict) -> str:
    return f"{row['time_s'] * 1e3:.1f} ({row['efficiency']:.2f}), {row['peak_device_bytes'] / 2**30:.2f}"


def summarize(rows: list[dict]) -> str:
    systems = list(dict.fromkeys(row["label"] for row in rows if row["fraction"] > 0))
    cases = list(dict.fromkeys(row["case"] for row in rows))
    table = []
    for case in cases:
        fractions = sorted({row["fraction_label"] for row in rows if row["case"] == case and row["fraction"] > 0},
                           key=lambda label: -Fraction(label))  # "1/2" before "1/8"
        for fraction in fractions:
            found = {row["label"]: row for row in rows if row["case"] == case and row["fraction_label"] == fraction}
            limit = next(iter(found.values()))["limit_s"] * 1e3
            table.append([case, fraction, f"{limit:.1f}", *(cell(found[s]) if s in found else "" for s in systems)])
    return tabulate(table, headers=["case", "offloaded", "limit ms", *systems], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    print(summarize(load_rows(parser.parse_args().paths)))


if __name__ == "__main__":
    main()
