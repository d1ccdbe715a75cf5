"""HPD (HPDv2) prompt preparation: training prompts and the benchmark evaluation prompts.

Every source is read through the HPDv2 dataset layout:
    train.json                 [{"prompt": ...}, ...]
    benchmark/<style>.json     ["...", ...] for anime, concept-art, paintings, photo
It comes from the Hugging Face hub (`ymhao/HPDv2`, dataset), a local copy of it on a cluster,
or the small set bundled with this package (offline default, same layout, same code path).
A plain-text file (one prompt per line) may replace train.json as the training source.

Cleaning handles messy prompts and counts each kind in the manifest (see `clean`); files are read
as bytes, so invalid UTF-8 costs the prompts that hold it, never the run.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from srpo.io import InputError, atomic_path, sha256_file, write_json

HPD_STYLES = ("anime", "concept-art", "paintings", "photo")
HUB_DATASET = "ymhao/HPDv2"
BUNDLED = Path(__file__).parent / "data" / "hpd_tiny"
CJK_HANDLING = ("keep", "drop")
DROP_REASONS = ("non_utf8", "empty", "cjk", "eval_overlap", "duplicate")
"""Why a prompt is dropped; a prompt is counted under the first reason that applies."""
DROP_LABELS = {
    "non_utf8": "non-UTF-8",
    "empty": "empty",
    "cjk": "CJK",
    "eval_overlap": "in the benchmark",
    "duplicate": "duplicate",
}
"""How the one-line summary names each reason."""
UNDECODABLE = re.compile("[\ud800-\udfff]")
"""Lone surrogates: undecodable bytes (surrogateescape) or a `\\udc80`-style JSON escape."""
CJK = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)
"""Han (with extensions and compatibility ideographs), Hiragana, Katakana and Hangul letters."""
T5_BATCH = 4096
"""Prompts per tokenizer call when counting T5 tokens."""


@dataclass(frozen=True)
class Cleaned:
    """One split after cleaning: kept prompts with whether characters were removed, drop counts."""

    kept: list[tuple[str, bool]]
    dropped: Counter[str]


def locate(source: str, path: str | None, train: bool = True) -> Path:
    """The folder holding the HPDv2 layout for `source` (bundled, local or hub); `train` False:
    the hub's train.json is not downloaded (a prompt file replaces it)."""
    if source == "bundled":
        return BUNDLED
    if source == "local":
        if not path:
            raise InputError("prompts.path: required when prompts.source is 'local'")
        return Path(path)
    if source == "hub":
        from huggingface_hub import snapshot_download

        patterns = [f"benchmark/{style}.json" for style in HPD_STYLES]
        patterns += ["train.json"] if train else []
        return Path(snapshot_download(HUB_DATASET, repo_type="dataset", allow_patterns=patterns))
    raise InputError(f"prompts.source: expected bundled, local or hub, got {source!r}")


def decode(path: Path) -> str:
    """The file's text, BOM dropped; bytes that are not UTF-8 become lone surrogates, so only
    the prompts holding them are lost (dropped and counted), not the run."""
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: not found (expected the HPDv2 dataset layout)")
    try:
        return json.loads(decode(path), strict=False)
    except ValueError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None


def read_train_json(folder: Path) -> list[str]:
    """Raw training prompts of an HPDv2 folder, in file order."""
    train_file = folder / "train.json"
    items = _load_json(train_file)
    if not isinstance(items, list) or not all(isinstance(i, dict) and "prompt" in i for i in items):
        raise InputError(f'{train_file}: expected a list of {{"prompt": ...}} objects')
    return [str(item["prompt"]) for item in items]


def read_benchmark(folder: Path) -> list[tuple[str, str]]:
    """Raw (style, prompt) pairs of an HPDv2 folder's benchmark, in style then file order."""
    evaluation = []
    for style in HPD_STYLES:
        style_file = folder / "benchmark" / f"{style}.json"
        prompts = _load_json(style_file)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{style_file}: expected a list of prompt strings")
        evaluation += [(style, prompt) for prompt in prompts]
    return evaluation


def read_lines(path: Path) -> list[str]:
    """One raw prompt per line of a text file (LF or CRLF endings), empty lines included."""
    if not path.is_file():
        raise InputError(f"{path}: training prompt file not found")
    lines = decode(path).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


@cache
def _controls() -> re.Pattern[str]:
    """Every control (Cc) and format (Cf: zero-width, bidi, BOM, soft hyphen) character."""
    kinds = ("Cc", "Cf")
    chars = "".join(
        c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) in kinds
    )
    return re.compile(f"[{re.escape(chars)}]")


def repair(prompt: str) -> tuple[str, bool]:
    """One line, single spaces: whitespace controls (tab, CR, LF) become spaces, other control and
    format characters are removed. Also says whether there was any control or format character."""
    text, count = _controls().subn(lambda m: " " if m.group().isspace() else "", prompt)
    return re.sub(r"\s+", " ", text).strip(), count > 0


def has_cjk(prompt: str) -> bool:
    """Whether any letter is Han, Hiragana, Katakana or Hangul (the authors drop such prompts)."""
    return CJK.search(prompt) is not None


def drop_reason(raw: str, prompt: str, cjk: str, exclude: set[str], seen: set[str]) -> str | None:
    """The first reason of DROP_REASONS that applies to a prompt, None when it is kept."""
    key = prompt.casefold()
    checks = {
        "non_utf8": UNDECODABLE.search(raw),
        "empty": not prompt,
        "cjk": cjk == "drop" and has_cjk(prompt),
        "eval_overlap": key in exclude,
        "duplicate": key in seen,
    }
    return next((reason for reason, hit in checks.items() if hit), None)


def clean(prompts: list[str], cjk: str = "keep", exclude: set[str] = frozenset()) -> Cleaned:
    """Drop prompts with undecodable bytes, empty ones, CJK ones if asked, those in `exclude`
    (case-folded) and duplicates (case-insensitive, after `repair`); keep the first in order."""
    seen: set[str] = set()
    kept, dropped = [], Counter()
    for raw in prompts:
        prompt, repaired = repair(raw)
        reason = drop_reason(raw, prompt, cjk, exclude, seen)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(prompt.casefold())
        kept.append((prompt, repaired))
    return Cleaned(kept, dropped)


def subsample(items: list, limit: int | None, seed: int, label: str) -> list:
    """At most `limit` items, a seeded choice that keeps the original order."""
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(f"{seed}:{label}").sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def load_t5_tokenizer(base_model: str) -> Any:
    """FLUX's T5 tokenizer (`tokenizer_2/`): the one whose truncation the text encoder applies."""
    from transformers import AutoTokenizer

    if Path(base_model).is_dir() and not (Path(base_model) / "tokenizer_2").is_dir():
        raise InputError(f"{base_model}: expected a FLUX base model folder with tokenizer_2/")
    try:
        return AutoTokenizer.from_pretrained(base_model, subfolder="tokenizer_2")
    except (OSError, ValueError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{base_model}: cannot load the T5 tokenizer ({detail})") from None


def count_over_limit(prompts: list[str], tokenizer: Any, limit: int) -> int:
    """Prompts of more than `limit` T5 tokens (with `</s>`, as the encoder counts): truncated."""
    batches = (prompts[i : i + T5_BATCH] for i in range(0, len(prompts), T5_BATCH))
    lengths = (len(ids) for b in batches for ids in tokenizer(b, verbose=False)["input_ids"])
    return sum(length > limit for length in lengths)


def split_report(
    read: int,
    written: list[tuple[str, bool]],
    dropped: Counter[str],
    tokenizer: Any,
    max_sequence_length: int,
) -> dict:
    """The manifest's account of one split: read = written + subsampled_out + sum(dropped)."""
    prompts = [prompt for prompt, _ in written]
    over = count_over_limit(prompts, tokenizer, max_sequence_length) if tokenizer else None
    return {
        "read": read,
        "dropped": {reason: dropped[reason] for reason in DROP_REASONS},
        "subsampled_out": read - len(written) - sum(dropped.values()),
        "written": len(written),
        "control_chars": sum(repaired for _, repaired in written),
        "cjk": sum(map(has_cjk, prompts)),
        "over_t5_limit": over,
    }


def dropped_text(dropped: Counter[str] | dict[str, int]) -> str:
    """`dropped 2 non-UTF-8, 1 duplicate`, in DROP_REASONS order, or `nothing dropped`."""
    drops = ", ".join(f"{dropped[r]:,} {DROP_LABELS[r]}" for r in DROP_REASONS if dropped[r])
    return f"dropped {drops}" if drops else "nothing dropped"


def summary(split: str, report: dict, max_sequence_length: int) -> str:
    """One line for the log: what was dropped, left out, repaired, kept as CJK and truncated."""
    notes = [dropped_text(report["dropped"])]
    extras = {
        "subsampled_out": "left out by the limit",
        "control_chars": "with control characters removed",
        "cjk": "CJK",
    }
    notes += [f"{report[key]:,} {label}" for key, label in extras.items() if report[key]]
    over = report["over_t5_limit"]
    notes.append(
        "T5 length not checked (no --base-model)"
        if over is None
        else f"{over:,} over {max_sequence_length} T5 tokens (truncated)"
    )
    return f"{split}: kept {report['written']:,} of {report['read']:,} ({'; '.join(notes)})"


def write_outputs(out_dir: Path, train: list[str], evaluation: list[tuple[str, str]]) -> None:
    """train.txt (one prompt per line) and eval.csv (prompt_id, style, prompt), atomically."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "train.txt") as staged:
        staged.write_text("\n".join(train) + "\n", encoding="utf-8")
    frame = pd.DataFrame(
        {
            "prompt_id": range(len(evaluation)),
            "style": [s for s, _ in evaluation],
            "prompt": [p for _, p in evaluation],
        }
    )
    with atomic_path(out_dir / "eval.csv") as staged:
        frame.to_csv(staged, index=False)


def clean_benchmark(
    raw: list[tuple[str, str]], cjk: str, per_style: int | None, seed: int
) -> tuple[list[tuple[str, str, bool]], Counter[str]]:
    """Each style cleaned on its own (a prompt may serve two styles), then subsampled."""
    evaluation, dropped = [], Counter()
    for style in HPD_STYLES:
        cleaned = clean([p for s, p in raw if s == style], cjk)
        dropped += cleaned.dropped
        chosen = subsample(cleaned.kept, per_style, seed, style)
        evaluation += [(style, prompt, repaired) for prompt, repaired in chosen]
    return evaluation, dropped


def prepare_prompts(
    out_dir: Path,
    source: str = "bundled",
    path: str | None = None,
    train_limit: int | None = None,
    eval_per_style: int | None = None,
    seed: int = 42,
    train_file: Path | None = None,
    cjk: str = "keep",
    base_model: str | None = None,
    max_sequence_length: int = 512,
) -> dict:
    """Write train.txt, eval.csv and manifest.json; evaluation prompts never train."""
    if cjk not in CJK_HANDLING:
        raise InputError(f"prompts.cjk: expected keep or drop, got {cjk!r}")
    if max_sequence_length < 1:
        raise InputError(f"--max-sequence-length: expected at least 1, got {max_sequence_length}")
    tokenizer = load_t5_tokenizer(base_model) if base_model else None
    folder = locate(source, path, train=train_file is None)
    train_source = Path(train_file) if train_file else folder / "train.json"
    raw_train = read_lines(train_source) if train_file else read_train_json(folder)
    raw_eval = read_benchmark(folder)
    evaluation, eval_dropped = clean_benchmark(raw_eval, cjk, eval_per_style, seed)
    cleaned = clean(raw_train, cjk, {prompt.casefold() for _, prompt, _ in evaluation})
    train = subsample(cleaned.kept, train_limit, seed, "train")
    if not train:
        detail = dropped_text(cleaned.dropped)
        raise InputError(f"{train_source}: no usable training prompt after cleaning ({detail})")
    out_dir = Path(out_dir)
    write_outputs(out_dir, [p for p, _ in train], [(s, p) for s, p, _ in evaluation])
    written_eval = [(prompt, repaired) for _, prompt, repaired in evaluation]
    manifest = {
        "source": source,
        "folder": str(folder),
        "train_file": str(train_file) if train_file else None,
        "cjk": cjk,
        "t5": {"tokenizer": base_model, "max_sequence_length": max_sequence_length},
        "cleaning": {
            "train": split_report(
                len(raw_train), train, cleaned.dropped, tokenizer, max_sequence_length
            ),
            "eval": split_report(
                len(raw_eval), written_eval, eval_dropped, tokenizer, max_sequence_length
            ),
        },
        "counts": {
            "train": len(train),
            "eval": len(evaluation),
            **{style: sum(s == style for s, _, _ in evaluation) for style in HPD_STYLES},
        },
        "limits": {"train": train_limit, "eval_per_style": eval_per_style, "seed": seed},
        "sha256": {name: sha256_file(out_dir / name) for name in ("train.txt", "eval.csv")},
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest
