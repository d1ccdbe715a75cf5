"""Sampling throughput: `srpo sample`'s pipeline calls vs the stock FluxPipeline call.

    python -m benchmarks.sampling FLUX_FOLDER PROMPTS OUT_JSON SETTINGS_JSON

Both load the same folder and draw each image's noise from its own seeded CPU generator; the
stock call is what a user writes (one prompt per call), ours is `srpo.sample.generate` at each
batch size of the suite.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from srpo.io import write_json
from srpo.prompts import read_eval_prompts
from srpo.runtime.precision import DTYPES
from srpo.sample import SampleSettings, generate, load_pipeline, prompt_seed


def _stock(pipe, prompts, settings: SampleSettings):
    """The stock call of the diffusers FLUX example, one prompt at a time."""
    images = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(prompt_seed(settings.seed, prompt.prompt_id))
        images += pipe(
            prompt=prompt.prompt,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            max_sequence_length=settings.max_sequence_length,
            generator=generator,
        ).images
    return images


def _ours(pipe, prompts, settings: SampleSettings):
    size = settings.batch_size
    images = []
    for start in range(0, len(prompts), size):
        images += generate(pipe, prompts[start : start + size], settings)
    return images


def _timed(function, *args):
    function(*args)  # warm-up on the same inputs
    start = time.perf_counter()
    images = function(*args)
    return images, time.perf_counter() - start


def _max_diff(first, second) -> int:
    return max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in zip(first, second, strict=True)
    )


def run(flux: str, prompt_file: Path, out: Path, options: dict) -> None:
    device = torch.device(options["device"])
    dtype = DTYPES[options["dtype"]]
    prompts = read_eval_prompts(prompt_file)[: options["prompts"]]
    base = SampleSettings(
        steps=options["steps"],
        height=options["px"],
        width=options["px"],
        max_sequence_length=options["text_tokens"],
        dtype=options["dtype"],
    )
    stock_pipe = load_pipeline(flux, None, dtype, device)
    stock_images, stock_seconds = _timed(_stock, stock_pipe, prompts, base)
    del stock_pipe
    pipe = load_pipeline(flux, None, dtype, device)
    ours = {}
    for batch in options["batches"]:
        settings = SampleSettings(**{**base.__dict__, "batch_size": batch})
        images, seconds = _timed(_ours, pipe, prompts, settings)
        ours[batch] = {
            "images_per_s": len(prompts) / seconds,
            "max_abs_pixel_diff_vs_stock": _max_diff(images, stock_images),
        }
    write_json(
        out,
        {
            "prompts": len(prompts),
            "stock_images_per_s": len(prompts) / stock_seconds,
            "ours": {str(batch): figures for batch, figures in ours.items()},
        },
    )


if __name__ == "__main__":
    folder, prompt_path, out_path, settings_json = sys.argv[1:5]
    run(folder, Path(prompt_path), Path(out_path), json.loads(settings_json))
