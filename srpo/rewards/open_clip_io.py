"""open_clip models from their published checkpoints, and tiny ones in the same layout.

Shared by the HPSv2.1 (ViT-H-14) and LAION aesthetic (ViT-L-14) scorers: registering a model
config, building the architecture without downloading weights, checking a state dict against it
in one line, and saving tiny checkpoints byte-identically.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import open_clip
import torch

from srpo.io import InputError, atomic_path


def register_config(model_config: Path) -> str:
    """Register an open_clip model-config JSON and return the model name open_clip gives it."""
    model_config = Path(model_config)
    try:
        config = json.loads(model_config.read_text())
    except (OSError, ValueError) as error:
        raise InputError(
            f"{model_config}: cannot read the open_clip model config ({type(error).__name__})"
        ) from None
    required = ("embed_dim", "vision_cfg", "text_cfg")
    if not isinstance(config, dict) or not all(key in config for key in required):
        raise InputError(
            f"{model_config}: not an open_clip model config (expected keys {', '.join(required)})"
        )
    open_clip.add_model_config(model_config)
    return model_config.stem


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "initialized randomly" with pretrained=None; the weights come next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def create_model(model_name: str) -> open_clip.CLIP:
    if open_clip.get_model_config(model_name) is None:
        raise InputError(
            f"open_clip has no model config named {model_name!r}; pass model_config=<json>"
        )
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(model_name, pretrained=None)
    finally:
        root.removeFilter(quiet)


def first_sentence(error: Exception) -> str:
    """The first sentence of an error: torch's load errors run to many lines of advice."""
    return str(error).strip().split("\n")[0].split(". ")[0] or type(error).__name__


def check_keys(
    checkpoint: Path, model_name: str, state: dict[str, torch.Tensor], model: torch.nn.Module
) -> None:
    """Say in one line how the checkpoint differs from the model, instead of torch's stack."""
    reference = model.state_dict()
    missing = sorted(reference.keys() - state.keys())
    unexpected = sorted(state.keys() - reference.keys())
    reshaped = sorted(
        key
        for key in reference.keys() & state.keys()
        if not isinstance(state[key], torch.Tensor) or state[key].shape != reference[key].shape
    )
    problems = [
        f"{len(keys)} {what} (e.g. {keys[0]!r})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
        if keys
    ]
    if problems:
        raise InputError(
            f"{checkpoint}: state_dict does not match open_clip {model_name} "
            f"({len(reference)} keys expected): {'; '.join(problems)}"
        )


def save_deterministic(path: Path, payload: object) -> None:
    """torch.save, byte-identical on every run, written atomically.

    torch.save goes to memory first, so the zip's record prefix is always `archive/` (saving to a
    path would name it after the file), and its other records (serialization id included) depend
    only on the tensors.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as staged:
        staged.write_bytes(buffer.getvalue())


def write_config(out_dir: Path, name: str, config: dict) -> str:
    """Write a tiny model's open_clip config JSON into `out_dir` and register it; its name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / name) as staged:
        staged.write_text(json.dumps(config, indent=2) + "\n")
    return register_config(out_dir / name)


def load_checkpoint(checkpoint: Path, what: str, expected: str) -> object:
    """torch.load (weights only) of a published checkpoint, or one line saying what is wrong."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: {what} not found (expected {expected})")
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(
            f"{checkpoint}: unreadable {what} ({first_sentence(error)}); expected {expected}"
        ) from None
