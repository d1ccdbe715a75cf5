"""Counter-based randomness of a run: prompt order, shared noise ε and per-sample mids.

Every draw is a pure function of (seed, step, sample), never of a stream's history, so a run on
W processes sees exactly the samples a run on B processes sees, and a resumed run continues with
the draws an uninterrupted one would have made.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from srpo.algorithm import SRPOSettings, draw_mid
from srpo.io import InputError
from srpo.runtime.seeds import derive_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def step_noise(seed: int, step: int, shape: Sequence[int]) -> torch.Tensor:
    """The step's rollout noise ε, float32, drawn on the CPU: the same on every rank."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "noise", step))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def sample_mid(seed: int, step: int, sample: int, settings: SRPOSettings) -> int:
    """Sample `sample`'s mid index at `step` from its own seeded stream."""
    return draw_mid(random.Random(derive_seed(seed, "mid", step, sample)), settings)


def batch_prompt_numbers(seed: int, step: int, batch_size: int, pool: Sequence[int]) -> list[int]:
    """The global batch of `step` (counted from 1): positions (step−1)·B … step·B − 1 of an
    endless sequence of seeded permutations of `pool`, one permutation per epoch."""
    numbers = []
    for position in range((step - 1) * batch_size, step * batch_size):
        epoch, offset = divmod(position, len(pool))
        generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
        order = torch.randperm(len(pool), generator=generator)
        numbers.append(pool[int(order[offset])])
    return numbers


def offline_images(folder: Path, prompt_count: int) -> dict[int, Path]:
    """Offline mode's real images, named by the prompt number they illustrate (`12.png`).

    Each file is opened once here, so a broken image stops the run before training starts.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: offline image folder not found")
    images = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not path.stem.isdigit() or int(path.stem) >= prompt_count:
            raise InputError(
                f"{path}: expected a file named <prompt number>.png with a number below "
                f"{prompt_count} (the prompts in the embedding cache)"
            )
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError) as error:
            raise InputError(f"{path}: unreadable image ({error})") from None
        images[int(path.stem)] = path
    if not images:
        raise InputError(f"{folder}: no images (expected <prompt number>.png files)")
    return images


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """[3, H, W] in [0, 1], resized to the training resolution."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(f"{path}: unreadable image ({error})") from None
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float() / 255
