"""The README's tables from `bench_profiles.py` results: one table per results file (per CPU kind).

    python benchmarks/tables.py                      # every benchmarks/results/profiles-*.json
    python benchmarks/tables.py FILE [FILE ...]

Each cell is flexunet's speed-up over the fastest peer at the same precision (the peer named when
it is not the same on every row), with the range over several files of the same CPU when given.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe  # noqa: E402

MODES = ("inference fp32", "inference bf16", "training fp32", "training bf16")


def table(runs: list[dict]) -> str:
    """Markdown for the runs of one CPU: each cell the median over the runs (flexunet's seconds, its
    speed-up), the speed-up's (min-max) when there are several."""
    modes = [m for m in MODES if any(m in rows for run in runs for rows in run["cases"].values())]
    cells = defaultdict(list)
    for run in runs:
        for case, rows in run["cases"].items():
            for mode in modes:
                if mode in rows:
                    cells[case, mode].append((rows[mode]["speed_up"], rows[mode]["fastest_peer"],
                                              rows[mode]["flexunet"]))
    cases = list(dict.fromkeys(case for run in runs for case in run["cases"]))
    lines = [f"| profile (input) | {' | '.join(f'{m} (s, speed-up vs fastest peer)' for m in modes)} |",
             "| --- |" + " --- |" * len(modes)]
    for case in cases:
        row = []
        for mode in modes:
            values = cells.get((case, mode))
            if not values:
                row.append("-")
                continue
            ratios = sorted(v[0] for v in values)
            seconds = statistics.median(v[2] for v in values)
            peers = "/".join(dict.fromkeys(v[1] for v in values))
            span = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            row.append(f"{seconds:.3f} s, {statistics.median(ratios):.2f}x{span} vs {peers}")
        lines.append(f"| {case} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    if not paths:
        paths = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profiles-*.json")))
    by_cpu = defaultdict(list)
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        by_cpu[describe(run["cpu"]) if "cpu" in run else "unnamed CPU"].append(run)
    for cpu, runs in by_cpu.items():
        print(f"{cpu}, {runs[0]['threads']} threads, {len(runs)} run(s)\n")
        print(table(runs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
