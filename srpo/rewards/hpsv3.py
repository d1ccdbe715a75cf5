"""HPSv3 (ICCV 2025): Qwen2-VL-7B-Instruct with a reward head; the score is μ, its first output.

Every score is computed by the published hpsv3 1.0.0 package's own `HPSv3RewardInferencer`: its
config yaml builds the Qwen2-VL model and processor (`model_name_or_path` names the base model),
`HPSv3.safetensors` is loaded into it strictly, and `reward(images, prompts)` applies the
package's prompt template and image resizing. So our number IS the reference implementation's.
The package pins transformers 4.45.2: it runs only in `.venv-hpsv3` (envs/metric-env.sh), and
this module imports it lazily so that the main environment can still list the metric.

The training reward `HPSv3Reward` (`load`) is the same inferencer in the package's own
differentiable mode; training with it therefore runs in `.venv-hpsv3` too (README, "Rewards").

`build_tiny` writes a random tiny model in the real layout — a Qwen2-VL folder with its
processor, a config yaml derived from the package's HPSv3_7B.yaml pointing at it, and
`HPSv3.safetensors` made by the package's own model factory — that loads through the same code.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from srpo.io import InputError, atomic_path, sha256_file
from srpo.rewards.base import Reward
from srpo.rewards.metric import Metric
from srpo.rewards.packaged import first_line, import_package, require_file
from srpo.scorers import SCORERS

ENVIRONMENT = SCORERS["hpsv3"].environment
TRAIN_COMMAND = f"torchrun-{ENVIRONMENT} [torchrun options] -m srpo train"
"""How a training job with an HPSv3 reward is launched outside the workflow, which runs it so
itself (`srpo-hpsv3 train` for one process; both written by envs/metric-env.sh)."""
PIXEL_RANGE = 255.0
"""The processor's `rescale_factor` is 1/255: it expects 0–255 pixel values, ours are in [0, 1]."""
CHECKPOINT_NAME = "HPSv3.safetensors"
CONFIG_NAME = "HPSv3_tiny.yaml"
BASE_NAME = "Qwen2-VL-tiny"

QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2-VL's added tokens, in the order of its tokenizer (ids 151643… there, 256… here)."""

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-7B-Instruct's chat template: the processor's `apply_chat_template` renders it."""

TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
}
"""Qwen2-VL-7B's text config at tiny width; the mrope sections add up to head_dim / 2 = 8.
Initialised 10× wider than the real 0.02: at 0.02 a random one-layer model attends almost
uniformly over ~3000 tokens, so two different images score within 1e-5 of each other."""

TINY_VISION = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2}
"""Its vision tower at tiny width (patch 14, merge 2 as in the real one); `hidden_size` is the
merger's output, which must equal the text hidden size."""


class HPSv3Metric(Metric):
    """HPSv3's μ, computed batch by batch by the hpsv3 package's own inferencer."""

    name = "hpsv3"
    version = "HPSv3"

    def __init__(self, inferencer: Any, checkpoint_sha256: dict[str, str], batch_size: int) -> None:
        super().__init__(inferencer.model, checkpoint_sha256, batch_size)
        self.inferencer = inferencer

    def to(self, device: torch.device | str, dtype: torch.dtype) -> HPSv3Metric:
        """Move and cast like the package does: the backbone in `dtype`, the head kept in fp32.

        The inferencer moves each batch to its own `device` attribute, so that follows too.
        """
        self.model.to(device=device, dtype=dtype)
        self.model.rm_head.to(torch.float32)
        self.inferencer.device = torch.device(device)
        return self

    def _score_batch(self, images: Sequence[Image.Image], prompts: list[str]) -> torch.Tensor:
        # reward() returns [B, 2] = (μ, σ); the package's README scores with μ.
        return self.inferencer.reward(list(images), prompts)[:, 0]


class HPSv3Reward(Reward):
    """HPSv3's μ as a semantic-relative reward, differentiable w.r.t. the pixels.

    HPSv3 reads image and prompt together, so there are no separate towers to take f, p and n
    from. For CLIP towers f·((1 + w)·p − n) = (1 + w)·(f·p) − f·n exactly: the SRP reward is that
    combination of two image–prompt scores. The HPSv3 SRP reward is the same combination of μ,
    scale·((1 + w)·μ(x, p) − μ(x, n)), with p and n the control-word prompts.

    μ comes from the package's inferencer built with `differentiable=True`: its prompt template,
    its `process_vision_info` resizing the tensor to 256·28·28 pixels (torchvision bicubic,
    antialiased; PIL's bicubic for PIL images) and its torch `Qwen2VLImageProcessor` (rescale,
    CLIP normalisation, patches + `image_grid_thw`) in place of the numpy one.
    """

    def __init__(self, inferencer: Any, scale: float) -> None:
        super().__init__()
        self.model = inferencer.model
        self.inferencer = inferencer
        self.scale = scale
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """μ [B] of image i (in [0,1], [B,3,H,W]) with prompt i, as the package computes it."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"hpsv3: {images.shape[0]} images but {len(prompts)} prompts")
        # The inferencer moves each batch to its own `device`: follow wherever we were moved.
        self.inferencer.device = self._device
        pixels = [image * PIXEL_RANGE for image in images]
        return self.inferencer.reward(pixels, list(prompts))[:, 0]

    def semantic_relative_reward(
        self, images: torch.Tensor, positive_prompt: str, negative_prompt: str, weight: float
    ) -> torch.Tensor:
        """scale · ((1 + w)·μ(x, p) − μ(x, n)) per image, both prompts in one batch."""
        count = images.shape[0]
        prompts = [positive_prompt] * count + [negative_prompt] * count
        mu = self.score(torch.cat([images, images]), prompts)
        return self.scale * ((1 + weight) * mu[:count] - mu[count:])


def _inferencer(
    checkpoint: Path, config: Path | None, differentiable: bool, command: str | None = None
) -> Any:
    """The package's `HPSv3RewardInferencer` on CPU, or one line saying what is wrong."""
    inference = import_package("hpsv3.inference", ENVIRONMENT, command)
    config = require_file(config or _published_config(), "HPSv3 config yaml")
    checkpoint = require_file(checkpoint, f"HPSv3 checkpoint (expected {CHECKPOINT_NAME})")
    try:
        return inference.HPSv3RewardInferencer(
            str(config), str(checkpoint), device="cpu", differentiable=differentiable
        )
    except (OSError, ValueError) as error:
        # OSError: the base model named in the yaml cannot be found; ValueError: bad yaml keys.
        raise InputError(f"{config}: cannot build HPSv3 from it ({first_line(error)})") from None
    except RuntimeError as error:
        # load_state_dict(strict=True) lists every missing and unexpected key.
        raise InputError(
            f"{checkpoint}: does not match the model {config} builds ({first_line(error)})"
        ) from None


def load(checkpoint: Path, config: Path | None, scale: float) -> HPSv3Reward:
    """The HPSv3 training reward from the same files, and the same loader, as `load_metric`;
    `scale` is `reward.hpsv3_scale` (srpo.config.HPSV3_SCALE says why its default)."""
    return HPSv3Reward(_inferencer(checkpoint, config, True, TRAIN_COMMAND), scale)


def load_metric(checkpoint: Path, config: Path | None = None, batch_size: int = 16) -> HPSv3Metric:
    """HPSv3 from `HPSv3.safetensors` and a config yaml (default: the package's HPSv3_7B.yaml).

    The yaml's `model_name_or_path` must resolve offline: a local Qwen2-VL-7B-Instruct folder,
    or the hub id with that model in the Hugging Face cache and HF_HUB_OFFLINE=1. Its `bf16`
    and `torch_dtype` decide the precision the model is built in (HPSv3_7B.yaml: bf16, which
    transformers refuses on a CPU-only machine); `load_metric`'s dtype casts afterwards, and the
    published numbers are bf16 ones. The model is built on CPU; `Metric.to` moves it.
    """
    inferencer = _inferencer(checkpoint, config, differentiable=False)
    checkpoint = Path(checkpoint)
    return HPSv3Metric(inferencer, {str(checkpoint): sha256_file(checkpoint)}, batch_size)


def _tiny_processor() -> Any:
    """A Qwen2-VL processor with a byte-level vocabulary (256 bytes + Qwen2-VL's added tokens).

    Built from a fixed token list, not trained, so it is identical on every machine; every text
    still tokenizes (one token per byte), as the real 151k-token vocabulary would.
    """
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_tokens = sorted(bytes_to_unicode().items())
    vocab = {token: index for index, (_, token) in enumerate(byte_tokens)}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = Qwen2TokenizerFast(
            vocab_file=str(folder / "vocab.json"),
            merges_file=str(folder / "merges.txt"),
            unk_token=None,
            bos_token=None,
            eos_token=None,
            pad_token=None,
        )
    # One at a time, so that the ids follow Qwen2-VL's order; then the roles it gives them.
    tokenizer.add_special_tokens({"pad_token": QWEN2_VL_SPECIAL_TOKENS[0]})
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS[1:])})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    return Qwen2VLProcessor(image_processor, tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _tiny_base(processor: Any) -> Any:
    """A random Qwen2-VL with tiny widths whose token ids agree with `processor`'s vocabulary."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = processor.tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vocab_size=len(processor.tokenizer),
        vision_config=TINY_VISION,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|vision_pad|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        torch_dtype="float32",
        **TINY_TEXT,
    )
    return Qwen2VLForConditionalGeneration(config)


def _published_config() -> Path:
    """The config the package's inferencer uses when given none: Qwen2-VL-7B-Instruct, bf16."""
    return Path(import_package("hpsv3", ENVIRONMENT).__file__).parent / "config" / "HPSv3_7B.yaml"


def _tiny_config(base: Path) -> dict[str, Any]:
    """The package's HPSv3_7B.yaml with the tiny base model, in fp32 (CPUs lack fast bf16)."""
    config = yaml.safe_load(_published_config().read_text())
    config.update(model_name_or_path=str(base.resolve()), bf16=False, torch_dtype="float32")
    return config


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write a random tiny HPSv3 (base folder, config yaml, checkpoint) into `out_dir`.

    Byte-identical on every run into the same `out_dir`; the yaml names the base folder by its
    absolute path (the package resolves `model_name_or_path` against the working directory), so
    builds into different folders differ in that one line.
    """
    inference = import_package("hpsv3.inference", ENVIRONMENT)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / BASE_NAME
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        processor = _tiny_processor()
        model = _tiny_base(processor)
    with atomic_path(base) as staged:
        model.save_pretrained(staged)
        processor.save_pretrained(staged)
    config_path = out_dir / CONFIG_NAME
    with atomic_path(config_path) as staged:
        staged.write_text(yaml.safe_dump(_tiny_config(base), sort_keys=False))
    # The reward model exactly as the inferencer builds it (special token added, embeddings
    # resized, head in fp32), with its random head and new embedding row seeded: the parser and
    # factory are taken from hpsv3.inference's namespace, i.e. the very functions it calls.
    dataclasses = (
        inference.DataConfig,
        inference.TrainingConfig,
        inference.ModelConfig,
        inference.PEFTLoraConfig,
    )
    (_, training, model_config, lora), _ = inference.parse_args_with_yaml(
        dataclasses,
        str(config_path),
        is_train=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reward_model, _, _ = inference.create_model_and_processor(model_config, lora, training)
    with atomic_path(out_dir / CHECKPOINT_NAME) as staged:
        save_file(reward_model.state_dict(), str(staged), metadata={"format": "pt"})
    return out_dir
