"""HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences; score = cosine(image, text).

The real checkpoint `HPS_v2.1_compressed.pt` is `{"state_dict": …}` for open_clip's ViT-H-14.
A tiny model with the same key layout (ViT-H-14's structure, tiny widths) is built offline by
`build_tiny` and loads through the very same `load`, via an open_clip model-config JSON.
`load_metric` wraps the same towers for evaluation, with the hpsv2 package's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from srpo.io import InputError, sha256_file
from srpo.rewards.base import CLIP_MEAN, CLIP_STD, RewardModel
from srpo.rewards.metric import CosineMetric
from srpo.rewards.open_clip_io import (
    check_keys,
    create_model,
    load_checkpoint,
    register_config,
    save_deterministic,
    write_config,
)

CHECKPOINT_NAME = "HPS_v2.1_compressed.pt"
CONFIG_NAME = "open_clip_config.json"

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""ViT-H-14's config (open_clip/model_configs/ViT-H-14.json) with tiny widths and depths."""


class HPSv2Reward(RewardModel):
    """HPSv2.1 towers; the reward and the score are plain cosines (no logit scale)."""

    def __init__(self, model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer) -> None:
        super().__init__(image_size=int(model.visual.image_size[0]))
        self.model = model
        self.tokenizer = tokenizer
        self.freeze()

    @property
    def score_scale(self) -> float:
        return 1.0

    @property
    def reward_scale(self) -> float:
        return 1.0

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self._device))


def _read_state_dict(checkpoint: Path, model_name: str) -> dict[str, torch.Tensor]:
    expected = f"a torch file holding {{'state_dict': …}} for open_clip {model_name}"
    payload = load_checkpoint(checkpoint, "HPSv2.1 checkpoint", expected)
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise InputError(f"{checkpoint}: no 'state_dict' entry; expected {expected}")
    return payload["state_dict"]


def load(
    checkpoint: Path, model_name: str = "ViT-H-14", model_config: Path | None = None
) -> HPSv2Reward:
    """Load HPSv2.1 the way the hpsv2 package does, offline: config, then the state dict."""
    checkpoint = Path(checkpoint)
    if model_config is not None:
        model_name = register_config(model_config)
    state = _read_state_dict(checkpoint, model_name)
    model = create_model(model_name)
    check_keys(checkpoint, model_name, state, model)
    model.load_state_dict(state)
    return HPSv2Reward(model, open_clip.get_tokenizer(model_name))


def eval_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The hpsv2 package's evaluation transform (`light_augmentation=True`) on one PIL image.

    Its `ResizeMaxSize`: to a float tensor first, then a bicubic (antialiased) tensor resize of
    the LONGEST side to `size`, zero padding centred to size×size, OpenAI mean/std — no crop, so
    the whole picture is scored. It resizes the tensor, not the PIL image: PIL's bicubic would
    move normalised pixels by up to ~0.5 on noisy images.
    """
    pixels = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    pixels = TF.resize(pixels, [new_height, new_width], InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_height, size - new_width
    padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
    return TF.normalize(TF.pad(pixels, padding, fill=0), list(CLIP_MEAN), list(CLIP_STD))


class HPSv2Metric(CosineMetric):
    """HPSv2.1 as the hpsv2 package scores: cosine of the normalised features (no logit scale)."""

    name = "hpsv2"
    version = "HPSv2.1"
    model: HPSv2Reward

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([eval_pixels(image, self.model.image_size) for image in images])


def load_metric(
    checkpoint: Path,
    model_name: str = "ViT-H-14",
    model_config: Path | None = None,
    batch_size: int = 16,
) -> HPSv2Metric:
    """The HPSv2.1 evaluation metric from the same files (and loader) as the training reward."""
    reward = load(checkpoint, model_name, model_config)
    return HPSv2Metric(reward, {str(checkpoint): sha256_file(checkpoint)}, batch_size)


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write a random tiny HPSv2.1 (checkpoint + model config) into `out_dir`; return `out_dir`.

    Byte-identical on every run (see `open_clip_io.save_deterministic`).
    """
    out_dir = Path(out_dir)
    model_name = write_config(out_dir, CONFIG_NAME, TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(model_name)
    save_deterministic(out_dir / CHECKPOINT_NAME, {"state_dict": model.state_dict()})
    return out_dir
