"""PickScore: a CLIP-H fine-tuned on Pick-a-Pic, loaded as a transformers `CLIPModel`.

score = logit_scale.exp() · cosine; the training reward uses logit_scale.exp() / 20 (SPEC §3.5,
the authors' PickScore recipe). Real weights come from a hub id or a local folder; the tiny
model of `build_tiny` is a `save_pretrained` folder in the same layout. `load_metric` wraps the
same towers for evaluation, preprocessing PIL images with the processor as PickScore's README does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BaseImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from srpo.io import InputError, atomic_path, sha256_file
from srpo.rewards.base import RewardModel
from srpo.rewards.metric import CosineMetric
from srpo.text_tokenizers import build_clip_tokenizer

REWARD_LOGIT_DIVISOR = 20.0
"""The authors' PickScore script scales the reward by logit_scale·(…)/20 (SPEC §3.5)."""

TINY_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "hidden_act": "gelu",
}
"""CLIP-H's structure (gelu, pre-norm towers, projections) with tiny widths and depths."""


class PickScoreReward(RewardModel):
    """PickScore's towers; `logit_scale` turns cosines into the published score."""

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(image_size=int(model.config.vision_config.image_size))
        self.model = model
        self.tokenizer = tokenizer
        self.freeze()

    @property
    def score_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def reward_scale(self) -> torch.Tensor:
        return self.score_scale / REWARD_LOGIT_DIVISOR

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return _projected(self.model.get_image_features(pixel_values=pixels))

    def _embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self._device)
        return _projected(
            self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )


def _projected(features: torch.Tensor | BaseModelOutputWithPooling) -> torch.Tensor:
    """The projected CLIP embedding: transformers 5 returns it as the output's pooler_output,
    transformers 4 (the hpsv3 environment, where a PickScore held-out metric or mix reward of an
    HPSv3 training runs) as the tensor itself."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _reason(path: str | Path, error: Exception) -> str:
    """One line: whether `path` was a missing folder, then transformers' first line."""
    lines = str(error).strip().splitlines()
    detail = lines[0] if lines else type(error).__name__
    if Path(path).exists():
        return detail
    return f"no such folder, and not loadable as a hub id: {detail}"


def _from_pretrained(loader: Any, path: str | Path, what: str, **options: Any) -> Any:
    """`loader.from_pretrained(path)`, or one line naming the path and what was expected."""
    try:
        return loader.from_pretrained(str(path), **options)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot load {what} ({_reason(path, error)})") from None


def load(model_path: str | Path, processor_path: str | Path | None = None) -> PickScoreReward:
    """Load PickScore from hub ids or folders (real: yuvalkirstain/PickScore_v1 and
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K for the processor)."""
    processor_path = model_path if processor_path is None else processor_path
    model = _from_pretrained(CLIPModel, model_path, "a transformers CLIPModel")
    tokenizer = _from_pretrained(AutoTokenizer, processor_path, "a CLIP tokenizer")
    return PickScoreReward(model, tokenizer)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""What `CLIPModel.from_pretrained` reads, in its order of preference (PickScore_v1: unsharded)."""


class PickScoreMetric(CosineMetric):
    """PickScore_v1 as its README scores: logit_scale.exp() · cosine, processor preprocessing."""

    name = "pickscore"
    version = "PickScore_v1"
    model: PickScoreReward

    def __init__(
        self,
        reward: PickScoreReward,
        image_processor: BaseImageProcessor,
        checkpoint_sha256: dict[str, str],
        batch_size: int = 16,
    ) -> None:
        super().__init__(reward, checkpoint_sha256, batch_size)
        self.image_processor = image_processor

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def _weight_file(model_path: str | Path) -> Path:
    """The weight file `CLIPModel.from_pretrained` read: in the folder, or in the hub cache."""
    folder = Path(model_path)
    for name in WEIGHT_FILES:
        found = folder / name if folder.is_dir() else try_to_load_from_cache(str(model_path), name)
        if isinstance(found, str | Path) and Path(found).is_file():
            return Path(found)
    raise InputError(f"{model_path}: no {' or '.join(WEIGHT_FILES)} (sharded weights unsupported)")


def load_metric(
    model_path: str | Path, processor_path: str | Path | None = None, batch_size: int = 16
) -> PickScoreMetric:
    """The PickScore metric from the same folders (and loader) as the training reward.

    The image processor is forced to transformers' PIL backend: the PIL processor is what
    PickScore's README ran (transformers 4.x); v5's default torchvision backend resizes tensors and
    moves normalised pixels by up to ~0.03.
    """
    processor_path = model_path if processor_path is None else processor_path
    reward = load(model_path, processor_path)
    image_processor = _from_pretrained(
        AutoImageProcessor, processor_path, "a CLIP image processor", backend="pil"
    )
    weights = _weight_file(model_path)
    hashes = {str(weights): sha256_file(weights)}
    return PickScoreMetric(reward, image_processor, hashes, batch_size)


def _tiny_config(tokenizer: PreTrainedTokenizerBase) -> CLIPConfig:
    text = {
        **TINY_TOWER,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**TINY_TOWER, "image_size": 224, "patch_size": 32}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write a random tiny PickScore folder (model + processor) to `out_dir`, replacing it whole.

    Byte-identical on every run: seeded init, safetensors (sorted keys, no timestamps) and JSON
    files whose content depends only on the config and the fixed tokenizer.
    """
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(_tiny_config(tokenizer))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    with atomic_path(out_dir) as staged:
        model.save_pretrained(staged)
        processor.save_pretrained(staged)
        # preprocessor_config.json too, as the published folder has it: transformers 4 (the
        # hpsv3 environment, where held-out evaluation runs when training with HPSv3) reads
        # only that one.
        processor.image_processor.save_pretrained(staged)
    return out_dir
