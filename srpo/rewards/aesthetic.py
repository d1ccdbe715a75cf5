"""LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

Real weights: OpenAI's `ViT-L-14.pt` (a TorchScript archive) and the predictor's state dict
`sac+logos+ava1-l14-linearMSE.pth`. The predictor was trained on embeddings from OpenAI's `clip`
package, whose ViT-L/14 uses QuickGELU: open_clip's plain `ViT-L-14` config is GELU and would
shift every embedding, so the default architecture is `ViT-L-14-quickgelu` (same keys). A tiny
model in the same layouts (open_clip state dict + model-config JSON + MLP) comes from `build_tiny`
and loads through the very same `load`.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict
from PIL import Image
from torch import nn

from srpo.io import InputError, sha256_file
from srpo.rewards.metric import PixelMetric
from srpo.rewards.open_clip_io import (
    check_keys,
    create_model,
    first_sentence,
    load_checkpoint,
    register_config,
    save_deterministic,
    write_config,
)

CLIP_MODEL = "ViT-L-14-quickgelu"
CLIP_CHECKPOINT_NAME = "ViT-L-14.pt"
MLP_CHECKPOINT_NAME = "sac+logos+ava1-l14-linearMSE.pth"
CONFIG_NAME = "clip_config.json"
"""Not `open_clip_config.json`: open_clip registers configs by file stem, and HPS's uses that."""

TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""ViT-L-14-quickgelu's config (open_clip/model_configs) with tiny widths and depths."""


class AestheticMLP(nn.Module):
    """The predictor's head as published (improved-aesthetic-predictor's `MLP`).

    Its ReLUs are commented out upstream, so the five linear layers compose to one affine map;
    the dropouts only matter in training. `layers.N` indices match the released state dict.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticModel(nn.Module):
    """CLIP image tower → L2 normalisation → MLP: one score per image."""

    def __init__(self, clip: open_clip.CLIP, mlp: AestheticMLP) -> None:
        super().__init__()
        self.clip = clip
        self.mlp = mlp

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        embeddings = nn.functional.normalize(self.clip.encode_image(pixels), dim=-1)
        return self.mlp(embeddings).squeeze(-1)


class AestheticMetric(PixelMetric):
    """The predicted aesthetic rating (about 1–10 for real weights); prompts are not used."""

    name = "aesthetic"
    version = "LAION-aesthetic-v2"
    model: AestheticModel

    def __init__(
        self, model: AestheticModel, checkpoint_sha256: dict[str, str], batch_size: int = 16
    ) -> None:
        super().__init__(model, checkpoint_sha256, batch_size)
        # CLIP's own eval transform: shortest side to 224 (bicubic), centre crop, OpenAI mean/std.
        self.transform = open_clip.image_transform(model.clip.visual.image_size, is_train=False)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.model(pixels)


def _is_torchscript(path: Path) -> bool:
    """OpenAI's released .pt files are TorchScript archives (they hold constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _read_clip_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict via open_clip's own reader (it drops OpenAI's metadata entries)."""
    expected = "OpenAI's TorchScript ViT-L-14.pt or an open_clip state dict"
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: CLIP checkpoint not found (expected {expected})")
    scripted = _is_torchscript(checkpoint)
    try:
        with warnings.catch_warnings():
            # torch.load on a TorchScript archive warns that it dispatches to (deprecated) jit.
            warnings.simplefilter("ignore", (UserWarning, FutureWarning))
            return load_state_dict(str(checkpoint), weights_only=not scripted)
    except Exception as error:
        raise InputError(
            f"{checkpoint}: unreadable CLIP checkpoint ({first_sentence(error)}); "
            f"expected {expected}"
        ) from None


def _read_mlp(checkpoint: Path, embed_dim: int) -> AestheticMLP:
    mlp = AestheticMLP(embed_dim)
    reference = mlp.state_dict()
    expected = f"the aesthetic MLP state dict ({', '.join(reference)})"
    state = load_checkpoint(checkpoint, "aesthetic MLP checkpoint", expected)
    if not isinstance(state, dict) or state.keys() != reference.keys():
        raise InputError(f"{checkpoint}: not {expected}")
    for key, tensor in reference.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise InputError(
                f"{checkpoint}: {key} is {shape}, expected {tuple(tensor.shape)} "
                f"for the CLIP model's {embed_dim}-dim embeddings"
            )
    mlp.load_state_dict(state)
    return mlp


def load(
    clip_checkpoint: Path,
    mlp_checkpoint: Path,
    model_name: str = CLIP_MODEL,
    model_config: Path | None = None,
) -> AestheticModel:
    """Load the predictor offline: CLIP from its config and checkpoint, then the MLP."""
    clip_checkpoint, mlp_checkpoint = Path(clip_checkpoint), Path(mlp_checkpoint)
    if model_config is not None:
        model_name = register_config(model_config)
    state = _read_clip_state(clip_checkpoint)
    clip = create_model(model_name)
    check_keys(clip_checkpoint, model_name, state, clip)
    clip.load_state_dict(state)
    return AestheticModel(clip, _read_mlp(mlp_checkpoint, clip.visual.output_dim))


def load_metric(
    clip_checkpoint: Path,
    mlp_checkpoint: Path,
    model_name: str = CLIP_MODEL,
    model_config: Path | None = None,
    batch_size: int = 16,
) -> AestheticMetric:
    """The aesthetic evaluation metric; its hashes name both weight files."""
    model = load(clip_checkpoint, mlp_checkpoint, model_name, model_config)
    hashes = {str(path): sha256_file(path) for path in (clip_checkpoint, mlp_checkpoint)}
    return AestheticMetric(model, hashes, batch_size)


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write a random tiny predictor (CLIP, its model config, MLP) into `out_dir`; return it.

    Byte-identical on every run (see `open_clip_io.save_deterministic`); CLIP and MLP draw
    from one seeded stream.
    """
    out_dir = Path(out_dir)
    model_name = write_config(out_dir, CONFIG_NAME, TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = create_model(model_name)
        mlp = AestheticMLP(TINY_CONFIG["embed_dim"])
    save_deterministic(out_dir / CLIP_CHECKPOINT_NAME, clip.state_dict())
    save_deterministic(out_dir / MLP_CHECKPOINT_NAME, mlp.state_dict())
    return out_dir
