"""Score a folder of sampled images with one metric: one parquet (and CSV) row per image.

An image whose bytes differ from the sha256 its sample manifest records (half-written, or
replaced since) is refused rather than scored (srpo.sample_manifest checks each); the outputs
are written atomically and a re-run removes what a killed run left, so a run killed anywhere
and run again writes the same bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from srpo.io import InputError, atomic_path, clear_staging, one_line
from srpo.sample_manifest import SampledImage, read_sample_manifest

SCORE_COLUMNS = (
    "prompt_id",
    "style",
    "prompt",
    "image",
    "score",
    "model",
    "metric",
    "metric_version",
    "checkpoint_sha256",
)


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(f"{path}: unreadable image, expected a PNG ({one_line(error)})") from None


def score_images(
    metric, images: Sequence[SampledImage], batch_size: int, progress: bool = True
) -> list[float]:
    """metric.score over batches, with a progress bar."""
    from rich.progress import track

    scores: list[float] = []
    batches = range(0, len(images), batch_size)
    for start in track(batches, description=f"scoring {metric.name}", disable=not progress):
        batch = images[start : start + batch_size]
        pixels = [open_rgb(image.path) for image in batch]
        with torch.no_grad():
            scores.extend(float(s) for s in metric.score(pixels, [image.prompt for image in batch]))
    return scores


def write_table(frame: pd.DataFrame, out_path: Path) -> None:
    """Parquet at `out_path` and the same rows as CSV beside it, each written atomically."""
    out_path = Path(out_path)
    clear_staging([out_path, out_path.with_suffix(".csv")])
    with atomic_path(out_path) as staged:
        frame.to_parquet(staged, index=False)
    with atomic_path(out_path.with_suffix(".csv")) as staged:
        frame.to_csv(staged, index=False)


def score_folders(
    samples: dict[str, Path],
    metric_name: str,
    out_path: Path,
    weights: dict[str, str],
    batch_size: int = 8,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> pd.DataFrame:
    """Score the images of every model's sample folder with one metric (loaded once).

    `samples` maps a model label (the name in the tables) to a gathered `srpo sample` folder.
    Writes one parquet + CSV with a row per (model, image).
    """
    from srpo.rewards.metric import load_metric

    if not samples:
        raise InputError("--samples: expected at least one LABEL=DIR")
    started = time.perf_counter()
    folders = {label: read_sample_manifest(folder) for label, folder in samples.items()}
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    metric = load_metric(metric_name, target, dtype, batch_size, **weights)
    checkpoint = json.dumps(metric.checkpoint_sha256, sort_keys=True)
    frames = []
    for label, images in folders.items():
        frames.append(
            pd.DataFrame(
                {
                    "prompt_id": [image.prompt_id for image in images],
                    "style": [image.style for image in images],
                    "prompt": [image.prompt for image in images],
                    "image": [str(image.path) for image in images],
                    "score": score_images(metric, images, batch_size),
                    "model": label,
                    "metric": metric.name,
                    "metric_version": metric.version,
                    "checkpoint_sha256": checkpoint,
                },
                columns=list(SCORE_COLUMNS),
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    write_table(frame, out_path)
    elapsed = time.perf_counter() - started
    means = frame.groupby("model", sort=False)["score"].mean()
    summary = ", ".join(f"{label} {mean:.4f}" for label, mean in means.items())
    print(f"{metric.version}: {len(frame)} images ({summary}) in {elapsed:.1f} s → {out_path}")
    return frame
