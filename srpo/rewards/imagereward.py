"""ImageReward v1.0: BLIP (ViT-L + a cross-attending BERT) with an MLP head, z-normalised.

Every score is the published image-reward 1.5 package's own `ImageReward.score(prompt, image)`
(its preprocessing, tokenizer call and normalisation) on its own `ImageReward` model class, built
from `med_config.json` and loaded with the `ImageReward.pt` state dict. So our number IS the
reference implementation's. The package pins timm 0.6.13 and needs transformers 4: it runs only in
`.venv-imagereward` (envs/metric-env.sh), and this module imports it lazily so that the main
environment can still list the metric.

BLIP's tokenizer is `BertTokenizer.from_pretrained("bert-base-uncased")`, a hub id hard-coded in
the package. transformers tries that name as a folder relative to the working directory first, so
a local tokenizer folder is served offline by building the model inside a scratch directory that
holds a `bert-base-uncased` link to it. Without one the name resolves as the package expects
(the Hugging Face cache; HF_HUB_OFFLINE=1 keeps it offline).

`build_tiny` writes a random model in the real layout. The package hard-codes the vision tower
(ViT-L/16 at 224 px, 303M parameters) and the head's 768 inputs, so only BERT can shrink: the
tiny `ImageReward.pt` is still about 1.3 GB.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from srpo.io import InputError, atomic_path, sha256_file
from srpo.rewards.metric import Metric
from srpo.rewards.packaged import first_line, import_package, require_file
from srpo.scorers import SCORERS

ENVIRONMENT = SCORERS["imagereward"].environment
CHECKPOINT_NAME = "ImageReward.pt"
MED_CONFIG_NAME = "med_config.json"
TOKENIZER_NAME = "bert-base-uncased"
"""The hub id BLIP's `init_tokenizer` loads; also the tiny tokenizer folder's name."""

TINY_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 1,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "encoder_width": 1024,
    "add_cross_attention": True,
}
"""ImageReward's med_config.json with one layer, a narrow MLP and short positions; hidden_size
stays 768 (the head's input). `vocab_size` is set to the tiny vocabulary plus BLIP's two tokens."""

TINY_WORDS = (
    *("a", "an", "the", "of", "in", "on", "at", "with", "and", "is", "portrait", "photo"),
    *("dog", "cat", "fox", "red", "blue", "green", "snow", "sofa", "lighthouse", "dusk"),
)
"""Whole words of the tiny WordPiece vocabulary; any other text falls back to letters."""


class ImageRewardMetric(Metric):
    """ImageReward's score, image by image through the package's own `score(prompt, image)`."""

    name = "imagereward"
    version = "ImageReward-v1.0"

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ImageRewardMetric:
        """Move the model; the package's `score` moves its inputs to `model.device`, so set it.

        float32 only: `score` feeds float32 pixels and casts the text features to float32.
        """
        if dtype != torch.float32:
            raise InputError(f"{self.name}: the ImageReward package scores in float32, not {dtype}")
        self.model.to(device=device)
        self.model.device = torch.device(device)
        return self

    def _score_batch(self, images: Sequence[Image.Image], prompts: list[str]) -> torch.Tensor:
        pairs = zip(prompts, images, strict=True)
        scores = [self.model.score(prompt, image) for prompt, image in pairs]
        return torch.tensor(scores)


@contextlib.contextmanager
def _bert_tokenizer_at(tokenizer: Path | None) -> Iterator[None]:
    """Make BLIP's `from_pretrained("bert-base-uncased")` load the folder `tokenizer`.

    Working directory: a scratch folder whose only entry is a `bert-base-uncased` link to
    `tokenizer`, for the duration of the block. Pass absolute paths to code run inside it.
    """
    if tokenizer is None:
        yield
        return
    tokenizer = Path(tokenizer).resolve()
    if not (tokenizer / "vocab.txt").is_file():
        raise InputError(f"{tokenizer}: not a BERT tokenizer folder (no vocab.txt)")
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / TOKENIZER_NAME).symlink_to(tokenizer, target_is_directory=True)
        with contextlib.chdir(scratch):
            yield


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(
            f"{checkpoint}: unreadable ImageReward checkpoint ({first_line(error)})"
        ) from None
    if not isinstance(state, dict):
        raise InputError(f"{checkpoint}: expected a state dict, found {type(state).__name__}")
    return state


def _build(package: Any, med_config: Path, tokenizer: Path | None) -> torch.nn.Module:
    """The package's `ImageReward` model on CPU, its BLIP tokenizer served from `tokenizer`."""
    med_config = med_config.resolve()
    try:
        with _bert_tokenizer_at(tokenizer):
            return package.ImageReward(med_config=str(med_config), device="cpu")
    except OSError as error:
        hint = "" if tokenizer else "; pass tokenizer=<a bert-base-uncased folder>"
        raise InputError(
            f"cannot load BLIP's BERT tokenizer {TOKENIZER_NAME!r} ({first_line(error)}){hint}"
        ) from None
    except (ValueError, TypeError) as error:
        raise InputError(f"{med_config}: not a BLIP med_config ({first_line(error)})") from None


def load_metric(
    checkpoint: Path, med_config: Path, tokenizer: Path | None = None, batch_size: int = 16
) -> ImageRewardMetric:
    """ImageReward from `ImageReward.pt` and `med_config.json` (both from THUDM/ImageReward).

    The package loads the state dict with strict=False; a parameter missing from the file would
    silently stay random, so missing parameters are an error here (extra keys are ignored, and
    buffers — BERT's position ids — may be absent, as there).
    """
    package = import_package("ImageReward.ImageReward", ENVIRONMENT)
    checkpoint = require_file(checkpoint, f"ImageReward checkpoint (expected {CHECKPOINT_NAME})")
    med_config = require_file(med_config, f"BLIP med_config (expected {MED_CONFIG_NAME})")
    model = _build(package, med_config, tokenizer)
    state = _read_state_dict(checkpoint)
    missing = sorted({name for name, _ in model.named_parameters()} - state.keys())
    if missing:
        raise InputError(
            f"{checkpoint}: {len(missing)} of the model's parameters are missing "
            f"(e.g. {missing[0]!r}); is it ImageReward.pt?"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise InputError(f"{checkpoint}: does not fit {med_config} ({first_line(error)})") from None
    return ImageRewardMetric(model, {str(checkpoint): sha256_file(checkpoint)}, batch_size)


def _write_tokenizer(folder: Path) -> int:
    """A tiny lowercase WordPiece vocabulary in bert-base-uncased's files; returns its size."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    digits = [str(digit) for digit in range(10)]
    pieces = [f"##{piece}" for piece in letters + digits]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,!?'-", *letters, *digits]
    vocab += pieces + list(TINY_WORDS)
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}) + "\n")
    return len(vocab)


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write a random ImageReward (state dict, med_config, tokenizer folder) into `out_dir`.

    Byte-identical on every run: the model is seeded, and torch.save writes to a staged file of
    the same name, so the zip's record names do not vary.
    """
    package = import_package("ImageReward.ImageReward", ENVIRONMENT)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = out_dir / TOKENIZER_NAME
    with atomic_path(tokenizer) as staged:
        vocab_size = _write_tokenizer(staged)
    med_config = out_dir / MED_CONFIG_NAME
    with atomic_path(med_config) as staged:
        # BLIP's init_tokenizer adds [DEC] and [ENC] to the vocabulary.
        config = {**TINY_MED_CONFIG, "vocab_size": vocab_size + 2}
        staged.write_text(json.dumps(config, indent=2) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(package, med_config, tokenizer)
        # The package's head init (std 1/769 in five linear layers, no activations) multiplies
        # to ~1e-9: every input would score -mean/std alike. Redraw it variance-preserving.
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    with atomic_path(out_dir / CHECKPOINT_NAME) as staged:
        torch.save(model.state_dict(), staged)
    return out_dir
