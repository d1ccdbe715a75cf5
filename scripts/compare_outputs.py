"""Compare two results/ folders of the tiny default byte for byte (scripts/same-outputs.sh).

Every file of either folder is compared. Bytes must be equal, except where a run writes its
circumstances rather than its results:
- JSON files (manifests, provenance, train_state.json, ...): equal once the keys that record
  when, where and from which commit a run happened (VOLATILE_KEYS) are dropped, at any depth;
- other text (the report's Markdown and HTML): equal once a commit id after the word "commit"
  is replaced by a placeholder;
- logs, benchmark timings, TensorBoard events and pickled process state (UNCOMPARED): listed,
  not compared.
Exit status 1 with one line per differing or missing file; 0 with a summary otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

VOLATILE_KEYS = re.compile(
    r"^(commit|git_commit|dirty|created|created_at|started|finished|time|timestamp|hostname|host"
    r"|node|seconds|elapsed_s|duration_s|wall_s|python|platform|argv|pid)$"
)
UNCOMPARED = re.compile(
    r"(^|/)logs/|(^|/)benchmarks/|events\.out\.tfevents|/rng-rank\d+\.pt$|\.metadata$|\.log$"
)


def without_volatile(value: object) -> object:
    if isinstance(value, dict):
        return {
            key: without_volatile(item)
            for key, item in value.items()
            if not VOLATILE_KEYS.match(str(key))
        }
    if isinstance(value, list):
        return [without_volatile(item) for item in value]
    return value


COMMIT = re.compile(rb"(commit\W{1,4})[0-9a-f]{40}")
TEXT = re.compile(r"\.(md|html|tex|txt|csv|yaml)$")


def same_text(left: bytes, right: bytes) -> bool:
    return COMMIT.sub(rb"\1<commit>", left) == COMMIT.sub(rb"\1<commit>", right)


def same_json(left: bytes, right: bytes) -> bool:
    try:
        return without_volatile(json.loads(left)) == without_volatile(json.loads(right))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def files(root: Path) -> dict[str, Path]:
    return {str(path.relative_to(root)): path for path in root.rglob("*") if path.is_file()}


def compare(left: Path, right: Path) -> tuple[dict[str, int], list[str]]:
    """Counts of the files by how they compared (uncompared ones: of `left`), and the problems
    found."""
    ours, theirs = files(left), files(right)
    skipped = sum(1 for name in ours if UNCOMPARED.search(name))
    ours = {name: path for name, path in ours.items() if not UNCOMPARED.search(name)}
    theirs = {name: path for name, path in theirs.items() if not UNCOMPARED.search(name)}
    counts = {
        "identical bytes": 0,
        "equal JSON (volatile keys dropped)": 0,
        "equal text (commit ids masked)": 0,
        "not compared": skipped,
    }
    problems = [f"only in {left}: {name}" for name in sorted(ours.keys() - theirs.keys())]
    problems += [f"only in {right}: {name}" for name in sorted(theirs.keys() - ours.keys())]
    for name in sorted(ours.keys() & theirs.keys()):
        a, b = ours[name].read_bytes(), theirs[name].read_bytes()
        if a == b:
            counts["identical bytes"] += 1
        elif name.endswith(".json") and same_json(a, b):
            counts["equal JSON (volatile keys dropped)"] += 1
        elif TEXT.search(name) and same_text(a, b):
            counts["equal text (commit ids masked)"] += 1
        else:
            problems.append(f"differs: {name}")
    return counts, problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(Path(arg).is_dir() for arg in argv):
        print("usage: compare_outputs.py RESULTS_A RESULTS_B (two folders)", file=sys.stderr)
        return 2
    counts, problems = compare(Path(argv[0]), Path(argv[1]))
    for line in problems:
        print(line, file=sys.stderr)
    print(", ".join(f"{count} {kind}" for kind, count in counts.items()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
