"""Peak GPU memory per rank of an `srpo train` run, estimated before any GPU is asked for.

Two sources, so that the estimate follows the code rather than a hand model of it:

- Model sizes are counted from the models themselves, built from their real configs under
  torch's FakeTensorMode (no weights, no memory): the FLUX transformer (from the base model's
  folder, the Hugging Face cache, or FLUX.1-dev's published config), its VAE and the reward.
  FSDP2's per-rank shards are counted parameter by parameter, as `fully_shard` pads them.
- Activations are measured, not modelled: the trainer's own computations (the transformer call
  with each block under `checkpoint_wrapper`, the VAE decode and reward with their backward) run
  on fake tensors while a dispatch mode adds up the bytes of every storage alive. Nothing is
  computed, so FLUX.1-dev at 720 px is measured without a GPU.

What is modelled from FSDP2's semantics on top of those: which parameters are gathered when
(`gather_params`), the all-gather buffer in flight, one block's unsharded gradients and their
fp32 reduce-scatter input. Not counted: the CUDA context, NCCL's buffers and the caching
allocator's rounding and fragmentation (hence `HEADROOM`), and the attention kernels' choice on
a GPU (the CPU's flash attention stands in: it keeps the output and log-sum-exp, as GPU flash
and memory-efficient attention do).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from srpo.config import TrainConfig

GB = 1e9
DEFAULT_GPU_BYTES = 80 * GB
"""An 80 GB GPU (A100/H100 80GB), counted as 80e9 bytes, when none is visible."""
HEADROOM = 0.9
"""Share of the GPU's memory the counted tensors may take before the estimate warns: the CUDA
context, NCCL's buffers and the allocator's fragmentation come on top of them."""
FULL_GATHER_SCOPES = ("rollout", "first_call", "step")
"""`gather_params` values that keep the whole transformer gathered for part of the step; any
other (FSDP2's own per-forward resharding) holds one block and the prefetched next one."""
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
"""black-forest-labs/FLUX.1-dev transformer/config.json, used when the folder is not local."""
FLUX_DEV_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
"""black-forest-labs/FLUX.1-dev vae/config.json."""
FLUX_DEV_TEXT_TOKENS = 512
"""T5 tokens of FLUX.1-dev's prompt embeddings (`encode.max_sequence_length` of the paper)."""
QWEN2_VL_7B: dict[str, Any] = {
    "text_config": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
"""Qwen/Qwen2-VL-7B-Instruct's config: HPSv3's backbone (its LM head replaced by a small
reward head)."""
IMAGEREWARD_PARAMETERS = 447_000_000
"""ImageReward (BLIP): ViT-L/16 image tower (~303 M), BERT-base text encoder with cross-attention
to it (~143 M), a small MLP head; counted by hand from that architecture, as its model class
cannot be built without its package."""
AESTHETIC_MLP = (768, 1024, 128, 64, 16, 1)
"""Widths of the LAION aesthetic predictor's MLP on CLIP ViT-L/14 features."""


# ------------------------------------------------------------------ live bytes
class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside this mode and still alive, and their peak.

    Storages of `ignore` (parameters, inputs the caller owns) are never counted, also when an
    op returns a view of them. `mark()` starts a new peak (a phase of its own)."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor in ignore:
            self._known[tensor.untyped_storage()] = None
        self.live = 0
        self.peak = 0

    def mark(self) -> None:
        self.peak = self.live

    def _free(self, size: int, _reference: weakref.ref) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._known:
                    size = storage.nbytes()
                    self._known[storage] = weakref.ref(storage, functools.partial(self._free, size))
                    self.live += size
                    self.peak = max(self.peak, self.live)
        return out


@contextmanager
def _fake(dtype: torch.dtype = torch.float32) -> Iterator[Any]:
    """Fake tensors on the CPU (no memory, no compute), modules built in `dtype`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    previous = torch.get_default_dtype()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    torch.set_default_dtype(dtype)
    try:
        with mode, warnings.catch_warnings():
            # e.g. the CPU's "Mismatch dtype between input and weight" under autocast
            warnings.simplefilter("ignore")
            yield mode
    finally:
        torch.set_default_dtype(previous)


# ------------------------------------------------------------------ the models
@dataclass(frozen=True)
class ModelConfigs:
    """The configs the estimate builds its models from (JSON-able, so measurements cache)."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    reward: dict[str, Any]
    """open_clip model config of the reward's towers (HPSv2.1's ViT-H-14 by default)."""
    reward_parameters: int | None = None
    """Parameters of a reward that is not the open_clip model above (hpsv3, a mix)."""
    metrics: dict[str, int] = field(default_factory=dict)
    """Held-out metric → its parameter count (fp32 on every rank for the whole run)."""
    notes: tuple[str, ...] = ()


def _local_config(base_model: str, subfolder: str) -> dict[str, Any] | None:
    from diffusers import ConfigMixin

    class _Config(ConfigMixin):
        config_name = "config.json"

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = _Config.load_config(base_model, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError):
        return None
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _open_clip_config(name: str, path: str | None) -> dict[str, Any]:
    import open_clip

    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"open_clip has no model config named {name!r}")
    return config


def _open_clip_parameters(config: dict[str, Any]) -> int:
    return _parameters(json.dumps(config, sort_keys=True), "open_clip")


def _file_parameters(path: Path) -> int | None:
    """Elements of the tensors stored in a weight file or a folder of safetensors."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(file.is_file() for file in files):
        return None
    total = 0
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as handle:
                total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle)
        else:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            total += sum(t.numel() for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor))
    return total


def published_metric_parameters(name: str) -> int:
    """Parameters of a held-out metric's published model, counted from its architecture."""
    if name in ("hpsv2", "pickscore"):  # both are ViT-H-14 CLIP towers
        return _open_clip_parameters(_open_clip_config("ViT-H-14", None))
    if name == "aesthetic":
        widths = AESTHETIC_MLP
        mlp = sum(a * b + b for a, b in itertools.pairwise(widths))
        return _open_clip_parameters(_open_clip_config("ViT-L-14", None)) + mlp
    if name == "hpsv3":
        return _parameters(json.dumps(QWEN2_VL_7B, sort_keys=True), "qwen2-vl-lm")
    if name == "imagereward":
        return IMAGEREWARD_PARAMETERS
    raise ValueError(f"unknown metric {name!r}")


def metric_parameters(name: str, paths: dict[str, str], published: bool = True) -> int | None:
    """A metric's parameters: from its weight files when they are all here, else its published
    model's (None when not `published`)."""
    counts = [_file_parameters(Path(value)) for value in paths.values() if value]
    if counts and all(count is not None for count in counts):
        return sum(counts)  # type: ignore[arg-type]
    return published_metric_parameters(name) if published else None


def model_configs(
    config: TrainConfig,
    transformer: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    reward: dict[str, Any] | None = None,
    published_metrics: bool = True,
) -> ModelConfigs:
    """The models a config trains with: given configs first, then the base model's folder (or
    the Hugging Face cache), then FLUX.1-dev's published configs. A held-out metric whose files
    are absent counts as its published model, or (not `published_metrics`, e.g. tiny models
    not yet built) as nothing, with a note."""
    notes: list[str] = []
    transformer = transformer or _local_config(config.base_model, "transformer")
    if transformer is None:
        transformer = FLUX_DEV_TRANSFORMER
        notes.append(f"{config.base_model}: not local, FLUX.1-dev's transformer config assumed")
    vae = vae or _local_config(config.base_model, "vae") or FLUX_DEV_VAE
    settings = config.reward
    reward_parameters = None
    if reward is None:
        if settings.kind == "hpsv2":
            reward = _open_clip_config(settings.model_name, settings.model_config_path)
        else:
            reward = _open_clip_config("ViT-H-14", None)
            reward_parameters = sum(published_metric_parameters(kind) for kind in settings.kinds())
            notes.append(
                f"reward {settings.kind}: published size; activations of ViT-H-14 stand in"
            )
    metrics = {}
    if config.evaluation.every:
        for name, paths in sorted(config.evaluation.metrics.items()):
            count = metric_parameters(name, paths, published_metrics)
            if count is None:
                notes.append(f"metric {name}: weight files absent, not counted")
            else:
                metrics[name] = count
    return ModelConfigs(
        dict(transformer), dict(vae), dict(reward), reward_parameters, metrics, tuple(notes)
    )


def _build(config_json: str, kind: str) -> torch.nn.Module:
    """A model of `kind` from its config (call inside `_fake`)."""
    config = json.loads(config_json)
    if kind == "transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(config)
    if kind == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(config)
    if kind == "open_clip":
        import open_clip

        return open_clip.CLIP(**config)
    if kind == "qwen2-vl-lm":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config))
        model.lm_head = torch.nn.Identity()  # HPSv3 scores with its own small head
        return model
    raise ValueError(kind)


@functools.lru_cache(maxsize=32)
def _shapes(config_json: str, kind: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with _fake():
        model = _build(config_json, kind)
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def _parameters(config_json: str, kind: str) -> int:
    return sum(math.prod(shape) for _, shape in _shapes(config_json, kind))


# ------------------------------------------------------------------ FSDP2 counts
@dataclass(frozen=True)
class TransformerCounts:
    """Parameter counts of the transformer as FSDP2 shards it over `world_size` ranks."""

    parameters: int
    shard: int
    """Elements a rank holds: each parameter's dim 0 padded to a multiple of W, divided by W."""
    gathered: int
    """Elements of the whole model all-gathered (with that padding)."""
    largest_block: int
    """Gathered elements of the largest FSDP2 unit among the blocks."""
    root: int
    """Gathered elements outside the blocks (embedders, final norm and projection)."""
    largest_tensor: int
    """Elements of the largest parameter: the one tensor in transit at start-up."""
    trainable_shard: int
    """`shard` of the trainable parameters (all of them; LoRA: the adapters)."""


def _padded(shape: tuple[int, ...], world: int) -> int:
    if not shape:
        return world
    return math.ceil(shape[0] / world) * world * math.prod(shape[1:])


def transformer_counts(
    config: dict[str, Any], world_size: int, lora: Any = None
) -> TransformerCounts:
    """Counts of the transformer of `config` at W = `world_size` (with LoRA adapters)."""
    shapes = list(_shapes(json.dumps(config, sort_keys=True), "transformer"))
    adapters: list[tuple[str, tuple[int, ...]]] = []
    if lora is not None:
        for name, shape in shapes:
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.endswith(tuple(lora.target_modules)):
                adapters += [
                    (f"{module}.lora_A", (lora.rank, shape[1])),
                    (f"{module}.lora_B", (shape[0], lora.rank)),
                ]
    everything = shapes + adapters
    blocks: dict[str, int] = {}
    root = 0
    for name, shape in everything:
        parts = name.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            key = ".".join(parts[:2])
            blocks[key] = blocks.get(key, 0) + _padded(shape, world_size)
        else:
            root += _padded(shape, world_size)
    trainable = adapters if lora is not None else everything
    return TransformerCounts(
        parameters=sum(math.prod(shape) for _, shape in everything),
        shard=sum(_padded(shape, world_size) for _, shape in everything) // world_size,
        gathered=sum(_padded(shape, world_size) for _, shape in everything),
        largest_block=max(blocks.values(), default=0),
        root=root,
        largest_tensor=max(math.prod(shape) for _, shape in everything),
        trainable_shard=sum(_padded(shape, world_size) for _, shape in trainable) // world_size,
    )


# ------------------------------------------------------------------ measurements
@dataclass(frozen=True)
class CallActivations:
    """Bytes beyond parameters and inputs during one transformer call (measured)."""

    forward_peak: int
    saved: int
    """Held from the forward's end until its backward: block inputs, outputs, autograd state."""
    backward_peak: int


class CudaBytes:
    """`LiveBytes`' interface on a real GPU: the caching allocator's bytes above those at entry
    (to compare the fake measurement with a real one)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def __enter__(self) -> CudaBytes:
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)

    @property
    def live(self) -> int:
        return torch.cuda.memory_allocated(self.device) - self.base

    @property
    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self.base

    def mark(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


def _policy(policy: str):
    from srpo.runtime.precision import POLICIES

    return POLICIES[policy]


def flux_for_measurement(config_json: str, checkpointing: bool) -> torch.nn.Module:
    """The transformer as `shard_transformer` leaves it: each block in a non-reentrant
    `checkpoint_wrapper` (with `checkpointing`). Build it where it should live (fake, meta)."""
    from srpo.train.parallel import checkpoint_blocks

    model = _build(config_json, "transformer")
    if checkpointing:
        checkpoint_blocks(model)
    return model


def train_parameters(model: torch.nn.Module, grad: bool, frozen_base: bool) -> None:
    """Which parameters get gradients; each is dropped as soon as it is made (FSDP2
    reduce-scatters them per block: that transient is added by the estimate)."""
    for parameter in model.parameters():
        parameter.requires_grad_(grad and not frozen_base)
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def flux_inputs(
    config: dict[str, Any], batch: int, image_tokens: int, text_tokens: int
) -> dict[str, torch.Tensor | None]:
    """fp32 inputs of a transformer call as `make_velocity` passes them (on the current
    default device, whatever the default dtype)."""

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float32)

    return {
        "hidden_states": zeros(batch, image_tokens, config["in_channels"]),
        "timestep": zeros(batch),
        "guidance": zeros(batch) if config.get("guidance_embeds") else None,
        "pooled_projections": zeros(batch, config["pooled_projection_dim"]),
        "encoder_hidden_states": zeros(batch, text_tokens, config["joint_attention_dim"]),
        "txt_ids": zeros(text_tokens, 3),
        "img_ids": zeros(image_tokens, 3),
    }


def run_transformer_call(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor | None],
    policy: str,
    grad: bool,
    meter: Any,
) -> CallActivations:
    """One call as the trainer makes it: FSDP2's cast of the inputs to the compute dtype, the
    policy's autocast, the root's cast of the output to fp32; then, with `grad`, the backward.
    `meter` (`LiveBytes` or `CudaBytes`) is entered around it."""
    from srpo.runtime.precision import under_autocast

    chosen = _policy(policy)
    device = next(model.parameters()).device
    call = under_autocast(model, chosen.transformer_autocast, device)
    with meter, torch.set_grad_enabled(grad):
        cast = {
            key: value.to(chosen.transformer_dtype) if value is not None else None
            for key, value in inputs.items()
        }
        output = call(**cast, return_dict=False)[0].float()
        del cast
        forward_peak, saved = meter.peak, meter.live
        if grad:
            meter.mark()
            output.backward(torch.ones_like(output))
        del output
        backward_peak = meter.peak if grad else 0
    return CallActivations(forward_peak, saved if grad else 0, backward_peak)


@functools.lru_cache(maxsize=64)
def measure_transformer_call(
    config_json: str,
    policy: str,
    checkpointing: bool,
    batch: int,
    image_tokens: int,
    text_tokens: int,
    grad: bool = True,
    frozen_base: bool = False,
) -> CallActivations:
    """`run_transformer_call` of the transformer of `config_json` on fake tensors."""
    with _fake(_policy(policy).transformer_dtype):
        model = flux_for_measurement(config_json, checkpointing)
        train_parameters(model, grad, frozen_base)
        inputs = flux_inputs(json.loads(config_json), batch, image_tokens, text_tokens)
        if grad and frozen_base:  # LoRA: the gradient reaches the adapters' inputs
            inputs["hidden_states"].requires_grad_()  # type: ignore[union-attr]
        owned = [*model.parameters(), *model.buffers()]
        owned += [t for t in inputs.values() if t is not None]
        return run_transformer_call(model, inputs, policy, grad, LiveBytes(owned))


def reward_for_measurement(reward_json: str) -> torch.nn.Module:
    """HPSv2Reward around the open_clip towers of `reward_json` (build it where it should
    live)."""
    import open_clip

    from srpo.rewards.hpsv2 import HPSv2Reward
    from srpo.rewards.open_clip_io import register_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "srpo_memory_reward.json"
        path.write_text(reward_json)
        name = register_config(path)
        tokenizer = open_clip.get_tokenizer(name)
    return HPSv2Reward(_build(reward_json, "open_clip"), tokenizer)


def a_branch() -> Any:
    """The denoise branch of a mid-range sample (make it outside fake mode: it reads values)."""
    from srpo.algorithm import SRPOSettings, plan_branches

    settings = SRPOSettings()
    return plan_branches(settings.timestep_length // 2, settings)[0]


def run_decode_reward(
    vae: torch.nn.Module,
    reward: torch.nn.Module,
    policy: str,
    height: int,
    width: int,
    branch: Any,
    meter: Any,
) -> int:
    """Peak bytes of one branch's VAE decode and reward, forward and backward to x̂₀: the
    trainer's own `FrozenVAE.decode`, `semantic_relative_reward` and `branch_reward_loss`."""
    from srpo.algorithm import SRPOSettings, branch_reward_loss
    from srpo.flux import FrozenVAE, LatentGeometry
    from srpo.runtime.precision import under_autocast

    chosen = _policy(policy)
    settings = SRPOSettings()
    device = next(vae.parameters()).device
    geometry = LatentGeometry(height, width, 2 ** (len(vae.config.block_out_channels) - 1))
    frozen = FrozenVAE(vae, geometry)
    decode = under_autocast(frozen.decode, chosen.vae_autocast, device)
    score = under_autocast(reward.semantic_relative_reward, chosen.reward_autocast, device)
    x0_hat = torch.zeros(1, geometry.num_tokens, 4 * vae.config.latent_channels, device=device)
    x0_hat.requires_grad_()
    with meter:
        output = branch_reward_loss(branch, decode, score, x0_hat, ("a", "b"), settings)
        output.loss.backward()
        del output
    return meter.peak


@functools.lru_cache(maxsize=16)
def measure_decode_reward(
    vae_json: str, reward_json: str, policy: str, height: int, width: int
) -> int:
    """`run_decode_reward` of the VAE and reward of these configs on fake tensors."""
    branch = a_branch()
    with _fake(_policy(policy).vae_dtype):
        vae = _build(vae_json, "vae")
    with _fake():
        reward = reward_for_measurement(reward_json)
        owned = [*vae.parameters(), *vae.buffers(), *reward.parameters(), *reward.buffers()]
        return run_decode_reward(vae, reward, policy, height, width, branch, LiveBytes(owned))


@functools.lru_cache(maxsize=16)
def measure_decode(vae_json: str, policy: str, batch: int, height: int, width: int) -> int:
    """Peak bytes of a no-grad `FrozenVAE.decode` of `batch` latents (held-out evaluation)."""
    from srpo.flux import FrozenVAE, LatentGeometry
    from srpo.runtime.precision import under_autocast

    chosen = _policy(policy)
    with _fake(chosen.vae_dtype):
        vae = _build(vae_json, "vae")
    geometry = LatentGeometry(height, width, 2 ** (len(vae.config.block_out_channels) - 1))
    with _fake():
        frozen = FrozenVAE(vae, geometry)
        decode = under_autocast(frozen.decode, chosen.vae_autocast, torch.device("cpu"))
        latents = torch.zeros(batch, geometry.num_tokens, 4 * vae.config.latent_channels)
        tracker = LiveBytes([*vae.parameters(), *vae.buffers(), latents])
        with tracker, torch.no_grad():
            decode(latents)
    return tracker.peak


# ------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """GPU bytes per rank of one run; the parts are those of the training phase with the
    highest peak (`phase`), start-up and evaluation are peaks of their own."""

    world_size: int
    precision: str
    gather_params: str
    parameters: int
    shards: int
    """fp32 master weights, this rank's shard."""
    gradients: int
    """fp32 gradient shards (from the first reduce-scatter of a step to `zero_grad`)."""
    optimizer: int
    """AdamW's exp_avg and exp_avg_sq, fp32 shards."""
    gathered: int
    """Parameters all-gathered in the compute dtype, with the one in flight."""
    activations: int
    """Measured activations of the phase, one block's unsharded gradients and the text
    conditioning of the local batch."""
    vae: int
    reward: int
    metrics: int
    """Held-out metric models (fp32, on every GPU for the whole run)."""
    phase: str
    phases: dict[str, int]
    """Every training phase's peak."""
    startup: int
    """Peak while the models are loaded and sharded."""
    evaluation: int
    """Peak of a held-out evaluation (0: `evaluation.every` is 0)."""
    host_rank0: int
    """Host bytes of rank 0 at start-up: the full fp32 transformer and its staging."""
    host_other_rank: int
    """Host bytes of any other rank at start-up: the VAE and reward before they move."""
    notes: tuple[str, ...] = ()

    @property
    def training(self) -> int:
        return self.phases[self.phase]

    @property
    def peak(self) -> int:
        return max(self.training, self.startup, self.evaluation)

    def host_per_node(self, ranks_per_node: int) -> int:
        """Host bytes of the node that holds rank 0, its ranks loading at once."""
        return self.host_rank0 + (ranks_per_node - 1) * self.host_other_rank

    def summary(self) -> str:
        """One line of figures (the doctor's detail)."""
        parts = ", ".join(
            f"{name} {size(getattr(self, name))}"
            for name in (
                "shards",
                "gradients",
                "optimizer",
                "gathered",
                "activations",
                "vae",
                "reward",
                "metrics",
            )
        )
        evaluation = size(self.evaluation) if self.evaluation else "none"
        return (
            f"peak {size(self.peak)} per rank at W={self.world_size} ({self.precision}, "
            f"gather_params {self.gather_params}): {self.phase} {size(self.training)} "
            f"({parts}); start-up {size(self.startup)}; evaluation {evaluation}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "training": self.training, "peak": self.peak}


def size(count: float) -> str:
    """Bytes in decimal units, e.g. 41.3 GB or 12.0 MB."""
    for unit in ("B", "KB", "MB"):
        if abs(count) < 1000:
            return f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gather_scopes() -> tuple[str, ...]:
    """The values `gather_params` accepts (read from the config schema)."""
    return get_args(TrainConfig.model_fields["gather_params"].annotation)


def estimate(
    config: TrainConfig,
    world_size: int,
    models: ModelConfigs | None = None,
    text_tokens: int = FLUX_DEV_TEXT_TOKENS,
) -> MemoryEstimate:
    """The per-rank peak of `config` trained on `world_size` ranks, phase by phase."""
    from srpo.flux import LatentGeometry

    models = models or model_configs(config)
    policy = config.precision
    chosen = _policy(policy)
    param_dtype, vae_dtype = chosen.transformer_dtype, chosen.vae_dtype
    compute = _bytes(param_dtype)
    counts = transformer_counts(models.transformer, world_size, config.lora)
    transformer_json = json.dumps(models.transformer, sort_keys=True)
    vae_json = json.dumps(models.vae, sort_keys=True)
    reward_json = json.dumps(models.reward, sort_keys=True)
    scale = 2 ** (len(models.vae["block_out_channels"]) - 1)
    image_tokens = LatentGeometry(config.height, config.width, scale).num_tokens
    local_batch = max(1, config.batch_size // world_size)
    calls = local_batch * (1 if config.fuse_branches else 2)
    call_batch = 2 if config.fuse_branches else 1
    lora = config.lora is not None

    shards = 4 * counts.shard
    gradients = 4 * counts.trainable_shard
    optimizer = 8 * counts.trainable_shard
    vae = _parameters(vae_json, "vae") * _bytes(vae_dtype)
    reward = 4 * (models.reward_parameters or _parameters(reward_json, "open_clip"))
    metrics = 4 * sum(models.metrics.values())
    resident = shards + optimizer + vae + reward + metrics
    conditioning = 4 * local_batch * (text_tokens * models.transformer["joint_attention_dim"])
    conditioning += 4 * local_batch * (models.transformer["pooled_projection_dim"] + 64)
    latents = 4 * local_batch * image_tokens * models.transformer["in_channels"]

    full = compute * (counts.gathered + counts.largest_block)  # + the all-gather in flight
    per_block = compute * (counts.root + 3 * counts.largest_block)  # 2 held + 1 in flight
    reduce = (compute + 4) * counts.largest_block  # unsharded grads + fp32 reduce-scatter input
    scope = config.gather_params
    checkpointing = config.activation_checkpointing
    call = measure_transformer_call(
        transformer_json, policy, checkpointing, call_batch, image_tokens, text_tokens, True, lora
    )
    rollout_act = measure_transformer_call(
        transformer_json, policy, checkpointing, local_batch, image_tokens, text_tokens, False
    ).forward_peak
    branch = measure_decode_reward(vae_json, reward_json, policy, config.height, config.width)

    def gathered_in(phase: str, first: bool) -> int:
        if scope == "step" or (phase == "rollout" and scope in FULL_GATHER_SCOPES):
            return full
        if first and scope == "first_call" and phase in ("forward", "decode", "backward"):
            return full
        if first and scope == "rollout" and phase == "forward":
            return full
        return compute * counts.root if phase == "decode" else per_block

    steady = conditioning + latents
    phases: dict[str, tuple[int, int, int]] = {}  # phase → (gathered, activations, gradients)
    phases["rollout"] = (gathered_in("rollout", True), steady + rollout_act, 0)
    for first in (True, False) if calls > 1 else (True,):
        tag = "first call" if first and calls > 1 else "call" if calls == 1 else "later calls"
        grads = 0 if first else gradients  # set to None by the last step's zero_grad
        phases[f"{tag}: forward"] = (
            gathered_in("forward", first),
            steady + call.forward_peak,
            grads,
        )
        phases[f"{tag}: decode+reward"] = (
            gathered_in("decode", first),
            steady + call.saved + branch,
            grads,
        )
        phases[f"{tag}: backward"] = (
            gathered_in("backward", first),
            steady + call.backward_peak + (0 if lora else reduce),
            gradients,
        )
    phases["optimizer"] = (compute * counts.root, steady, gradients)
    totals = {name: resident + sum(parts) for name, parts in phases.items()}
    phase = max(totals, key=totals.__getitem__)
    gathered, activations, grads_now = phases[phase]

    startup = vae + reward + shards + 4 * counts.largest_tensor
    startup = max(startup, vae + reward + shards + metrics)
    evaluation = 0
    if config.evaluation.every:
        batch = config.evaluation.batch_size
        if config.evaluation.max_prompts:
            batch = min(batch, math.ceil(config.evaluation.max_prompts / world_size))
        eval_forward = measure_transformer_call(
            transformer_json, policy, checkpointing, batch, image_tokens, text_tokens, False
        ).forward_peak
        eval_decode = measure_decode(vae_json, policy, batch, config.height, config.width)
        evaluation = resident + max(full + eval_forward, compute * counts.root + eval_decode)
    host_other = reward * 2 + 4 * _parameters(vae_json, "vae")  # module + state dict; VAE
    return MemoryEstimate(
        world_size=world_size,
        precision=policy,
        gather_params=scope,
        parameters=counts.parameters,
        shards=shards,
        gradients=grads_now,
        optimizer=optimizer,
        gathered=gathered,
        activations=activations,
        vae=vae,
        reward=reward,
        metrics=metrics,
        phase=phase,
        phases=totals,
        startup=startup,
        evaluation=evaluation,
        host_rank0=4 * counts.parameters + host_other,
        host_other_rank=host_other,
        notes=models.notes,
    )


def gpu_bytes() -> tuple[int, str]:
    """The visible GPU's memory, or `DEFAULT_GPU_BYTES`; and where the figure came from."""
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return int(properties.total_memory), properties.name
    return int(DEFAULT_GPU_BYTES), "no GPU visible: 80 GB assumed"


def verdict(estimate_: MemoryEstimate, limit: int) -> str:
    """ok, warn (above `HEADROOM` of the limit) or fail (above the limit)."""
    if estimate_.peak > limit:
        return "fail"
    return "warn" if estimate_.peak > HEADROOM * limit else "ok"
