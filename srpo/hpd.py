"""HPD (HPDv2) prompt preparation: training prompts and the benchmark evaluation prompts.

Every source is read through the HPDv2 dataset layout:
    train.json                 [{"prompt": ...}, ...]
    benchmark/<style>.json     ["...", ...] for anime, concept-art, paintings, photo
It comes from the Hugging Face hub (`ymhao/HPDv2`, dataset), a local copy of it on a cluster,
or the small set bundled with this package (offline default, same layout, same code path).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from srpo.io import InputError, atomic_path, sha256_file, write_json

HPD_STYLES = ("anime", "concept-art", "paintings", "photo")
HUB_DATASET = "ymhao/HPDv2"
BUNDLED = Path(__file__).parent / "data" / "hpd_tiny"
MAX_PROMPT_CHARS = 1000
"""Longer captions are dropped: T5 truncates at 512 tokens and CLIP at 77 anyway."""


@dataclass(frozen=True)
class PromptSets:
    train: list[str]
    eval: list[tuple[str, str]]  # (style, prompt)


def locate(source: str, path: str | None) -> Path:
    """The folder holding the HPDv2 layout for `source` (bundled, local or hub)."""
    if source == "bundled":
        return BUNDLED
    if source == "local":
        if not path:
            raise InputError("prompts.path: required when prompts.source is 'local'")
        return Path(path)
    if source == "hub":
        from huggingface_hub import snapshot_download

        patterns = ["train.json", *(f"benchmark/{style}.json" for style in HPD_STYLES)]
        return Path(snapshot_download(HUB_DATASET, repo_type="dataset", allow_patterns=patterns))
    raise InputError(f"prompts.source: expected bundled, local or hub, got {source!r}")


def _load_json(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: not found (expected the HPDv2 dataset layout)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None


def read_hpd(folder: Path) -> PromptSets:
    """Raw prompts of an HPDv2 folder, in file order."""
    train_file = folder / "train.json"
    items = _load_json(train_file)
    if not isinstance(items, list) or not all(isinstance(i, dict) and "prompt" in i for i in items):
        raise InputError(f'{train_file}: expected a list of {{"prompt": ...}} objects')
    evaluation = []
    for style in HPD_STYLES:
        style_file = folder / "benchmark" / f"{style}.json"
        prompts = _load_json(style_file)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{style_file}: expected a list of prompt strings")
        evaluation += [(style, prompt) for prompt in prompts]
    return PromptSets([str(item["prompt"]) for item in items], evaluation)


def normalise(prompt: str) -> str:
    """One line, single spaces, no surrounding whitespace."""
    return re.sub(r"\s+", " ", prompt).strip()


def clean(prompts: list[str], exclude: set[str] = frozenset()) -> list[str]:
    """Drop empty, over-long and duplicate prompts (case-insensitive), keeping first order."""
    seen = {p.casefold() for p in exclude}
    kept = []
    for prompt in map(normalise, prompts):
        key = prompt.casefold()
        if not prompt or len(prompt) > MAX_PROMPT_CHARS or key in seen:
            continue
        seen.add(key)
        kept.append(prompt)
    return kept


def subsample(items: list, limit: int | None, seed: int, label: str) -> list:
    """At most `limit` items, a seeded choice that keeps the original order."""
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(f"{seed}:{label}").sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def prepare_prompts(
    out_dir: Path,
    source: str = "bundled",
    path: str | None = None,
    train_limit: int | None = None,
    eval_per_style: int | None = None,
    seed: int = 42,
) -> dict:
    """Write train.txt, eval.csv and manifest.json; evaluation prompts never train."""
    import pandas as pd

    folder = locate(source, path)
    raw = read_hpd(folder)
    evaluation = []
    for style in HPD_STYLES:
        prompts = clean([p for s, p in raw.eval if s == style])
        evaluation += [(style, p) for p in subsample(prompts, eval_per_style, seed, style)]
    train = subsample(clean(raw.train, {p for _, p in evaluation}), train_limit, seed, "train")
    if not train:
        raise InputError(f"{folder / 'train.json'}: no usable training prompt after cleaning")
    out_dir = Path(out_dir)
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
    manifest = {
        "source": source,
        "folder": str(folder),
        "raw_counts": {"train": len(raw.train), "eval": len(raw.eval)},
        "counts": {
            "train": len(train),
            "eval": len(evaluation),
            **{style: sum(s == style for s, _ in evaluation) for style in HPD_STYLES},
        },
        "limits": {"train": train_limit, "eval_per_style": eval_per_style, "seed": seed},
        "sha256": {name: sha256_file(out_dir / name) for name in ("train.txt", "eval.csv")},
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest
