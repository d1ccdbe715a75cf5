"""Print a Markdown table of a run's per-rule Snakemake benchmark files (wall s, max RSS MB).

Usage: python benchmarks/summarise.py results/tiny/benchmarks
Every rule writes `benchmark:` TSVs (columns s, h:m:s, max_rss, …); this collects them.
"""

import sys
from pathlib import Path

import pandas as pd


def main(folder: Path) -> None:
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        frame = pd.read_csv(path, sep="\t")
        name = str(path.relative_to(folder).with_suffix(""))
        rows.append((name, float(frame["s"].iloc[-1]), float(frame["max_rss"].iloc[-1])))
    print("| job | wall (s) | max RSS (MB) |\n|---|---|---|")
    for name, seconds, rss in rows:
        print(f"| {name} | {seconds:.2f} | {rss:.0f} |")
    print(f"| **sum of jobs** | {sum(r[1] for r in rows):.2f} | |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/tiny/benchmarks"))
