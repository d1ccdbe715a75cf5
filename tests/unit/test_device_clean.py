"""Device math on a device that is not the CPU, without a GPU: the models, latents and
embeddings are fake CUDA tensors (FakeTensorMode: shapes, dtypes and devices, no data) while the
host's own math (sigma schedules, branch plans) stays real, so a CPU tensor of one or more
dimensions that meets device tensors fails here as it fails on a GPU; a 0-dim CPU tensor
passes, as on a GPU."""

import types

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from support import tiny_config
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

import srpo.train.step
from srpo.algorithm import SRPOSettings, direct_align, plan_branches
from srpo.config import TrainConfig
from srpo.encode import EmbeddingCache
from srpo.flux import FrozenVAE, LatentGeometry, vae_scale_factor
from srpo.rewards import load_reward
from srpo.runtime.precision import POLICIES
from srpo.train.step import GatherScopes, StepBatch, Trainer
from srpo.train.timing import PhaseTimer

CUDA = torch.device("cuda", 0)


class FakeCuda(TorchFunctionMode):
    """Calls that touch a fake tensor or name a CUDA device run under FakeTensorMode (a real CPU
    input then becomes a fake CPU tensor, which device math refuses as CUDA does); the others
    run for real, so host-side values (`float(sigma)`) stay readable."""

    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        device_work = any(isinstance(leaf, FakeTensor) for leaf in leaves) or any(
            isinstance(leaf, torch.device | str) and str(leaf).startswith("cuda") for leaf in leaves
        )
        if not device_work:
            return func(*args, **kwargs)
        with self.fake:
            return func(*args, **kwargs)

    def on_device(
        self, module: torch.nn.Module, dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """`module` with every parameter and buffer a fake CUDA tensor of the same shape."""
        return module._apply(lambda tensor: self.fake.from_tensor(tensor.to(dtype)).to(CUDA))


@pytest.fixture
def fake_cuda():
    with FakeCuda() as mode:
        yield mode


def test_the_canary_fails_like_a_gpu(fake_cuda):
    """What the other tests rely on: a 1-D CPU tensor in device math raises, a 0-dim passes,
    and host math stays real."""
    device_tensor = torch.ones(2, 3, 4, device=CUDA)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ones(2, 1, 1) * device_tensor
    assert (torch.tensor(0.5) * device_tensor).device == CUDA
    assert float(torch.linspace(0, 1, 5)[2]) == 0.5


def test_direct_align_with_per_row_sigmas_on_the_device():
    """The fused branches' sigmas are stacked from CPU scalars (a 1-D CPU tensor)."""
    branches = plan_branches(300, SRPOSettings())
    inject = torch.stack([branch.sigma_inject for branch in branches])
    target = torch.stack([branch.sigma_target for branch in branches])
    with FakeCuda():
        x0_hat, seen = _direct_align_on_device(inject, target)
    assert x0_hat.device == CUDA and x0_hat.shape == (2, 16, 64)
    assert seen == [[float(s) for s in inject]]


def _direct_align_on_device(inject, target):
    x0 = torch.randn(2, 16, 64, device=CUDA)
    noise = torch.randn(1, 16, 64, device=CUDA)
    seen = []

    def velocity(x, sigma):
        seen.append(sigma)
        return x * 0.5

    return direct_align(velocity, x0, noise, inject, target), seen


def device_trainer(models, cache, tmp_path, precision: str, device, place) -> Trainer:
    """A Trainer on `device` whose models, VAE and reward were moved there by `place` (not
    sharded: the step's math, not FSDP2, is under test), built from the tiny models on disk."""
    config = TrainConfig.model_validate(
        tiny_config(models, cache, tmp_path / "run", precision=precision)
    )
    flux = models / "flux"
    transformer = FluxTransformer2DModel.from_config(
        FluxTransformer2DModel.load_config(str(flux), subfolder="transformer")
    )
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(flux), subfolder="vae"))
    reward = load_reward(config.reward.kind, **config.reward.load_arguments())
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.settings = config, config.settings()
    trainer.ctx = types.SimpleNamespace(device=device, rank=0, world_size=1)
    trainer.local_batch = config.batch_size
    trainer.precision = POLICIES[precision]
    trainer.model = place(transformer, trainer.precision.transformer_dtype)
    trainer.guidance_embeds = bool(transformer.config.guidance_embeds)
    trainer.geometry = LatentGeometry(config.height, config.width, vae_scale_factor(vae))
    trainer.vae = FrozenVAE(place(vae, trainer.precision.vae_dtype), trainer.geometry)
    trainer.reward = place(reward, torch.float32)
    trainer.timer = PhaseTimer(torch.device("cpu"))  # no device to synchronise here
    trainer.gather = GatherScopes(trainer.model, config.gather_params)
    trainer.step, trainer.images = 1, {}
    return trainer


def run_branches(trainer: Trainer, fuse: bool):
    """One step's `_branches` on two samples; the logging reads of device scalars (a sync on
    a GPU) read 0, since fake and meta tensors hold no values."""
    trainer.config = trainer.config.model_copy(update={"fuse_branches": fuse})
    device = trainer.ctx.device
    cond = EmbeddingCache(trainer.config.embeddings).get([0, 1]).to(device, torch.float32)
    noise = torch.randn(trainer.geometry.token_shape(1), device=device)
    return trainer._branches(StepBatch(range(2), [0, 1], cond, noise))


@pytest.mark.parametrize("precision", ["fp32", "fsdp-bf16", "autocast-bf16"])
@pytest.mark.parametrize("fuse", [True, False])
def test_a_train_step_forward_runs_on_cuda(
    tiny_models, tiny_cache, tmp_path, monkeypatch, precision, fuse
):
    """Rollout, both Direct-Align branches, VAE decode and reward on fake CUDA tensors, under
    each policy's dtypes (torch turns autocast itself off without a GPU, with a warning).
    Autograd's engine needs a real GPU for CUDA tensors, so the backward is left to the
    meta-device test below."""
    monkeypatch.setattr(srpo.train.step, "float", lambda value: 0.0, raising=False)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *args, **kwargs: None)
    with FakeCuda() as mode:
        trainer = device_trainer(tiny_models, tiny_cache, tmp_path, precision, CUDA, mode.on_device)
        stats = run_branches(trainer, fuse)
    assert sorted(stats.values) == [
        "loss/denoise", "loss/inversion", "reward/denoise", "reward/inversion",
    ]  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "fsdp-bf16"])
@pytest.mark.parametrize("fuse", [True, False])
def test_a_train_step_with_its_backward_runs_on_another_device(
    tiny_models, tiny_cache, tmp_path, monkeypatch, precision, fuse
):
    """The same on the meta device (where a 1-D CPU tensor in device math raises as on CUDA)
    with the backward to the transformer's parameters: everything of a step but FSDP2 and the
    optimizer. (autocast has no meta device: its policy runs forward-only above.)"""
    monkeypatch.setattr(srpo.train.step, "float", lambda value: 0.0, raising=False)
    meta = torch.device("meta")

    def place(module, dtype):
        return module.to(dtype).to(meta)

    trainer = device_trainer(tiny_models, tiny_cache, tmp_path, precision, meta, place)
    run_branches(trainer, fuse)
    gradients = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert gradients and all(g.device == meta for g in gradients)
