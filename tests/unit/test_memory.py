"""The per-rank memory estimate (srpo/memory.py) and its row in `srpo doctor`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)

from srpo import memory
from srpo.config import TrainConfig, load_train_config
from srpo.doctor import Doctor, load_workflow_config
from srpo.memory import (
    FLUX_DEV_TRANSFORMER,
    LiveBytes,
    estimate,
    flux_inputs,
    model_configs,
    run_transformer_call,
    train_parameters,
    transformer_counts,
)
from srpo.rewards.hpsv2 import TINY_CONFIG
from srpo.tiny import tiny_transformer, tiny_vae

REPO = Path(__file__).resolve().parents[2]


def plain(model: torch.nn.Module) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def flux_dev_by_hand(config: dict) -> int:
    """FLUX.1-dev's parameters from its config, layer by layer (diffusers' module shapes)."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    d = config["attention_head_dim"]
    linear = lambda i, o: i * o + o  # noqa: E731
    embedders = 2 * (linear(256, h) + linear(h, h))  # timestep and guidance embedders
    embedders += linear(config["pooled_projection_dim"], h) + linear(h, h)  # pooled text
    embedders += linear(config["joint_attention_dim"], h) + linear(config["in_channels"], h)
    double = 2 * linear(h, 6 * h)  # norm1 and norm1_context (AdaLayerNormZero)
    double += 8 * linear(h, h)  # q, k, v, out of each stream
    double += 4 * d  # RMSNorm of q and k of each stream
    double += 2 * (linear(h, 4 * h) + linear(4 * h, h))  # ff and ff_context
    single = linear(h, 3 * h) + linear(h, 4 * h) + linear(5 * h, h) + 3 * linear(h, h) + 2 * d
    out = linear(h, 2 * h) + linear(h, config["in_channels"])  # norm_out, proj_out
    return embedders + config["num_layers"] * double + config["num_single_layers"] * single + out


def test_flux_dev_built_on_fake_tensors_has_11_9_billion_parameters():
    counts = transformer_counts(FLUX_DEV_TRANSFORMER, 1)
    assert counts.parameters == flux_dev_by_hand(FLUX_DEV_TRANSFORMER) == 11_901_408_320
    assert counts.gathered == counts.shard == counts.parameters  # W = 1: nothing padded


@pytest.mark.parametrize("world", [8, 32])
def test_fsdp2_shards_pad_each_parameter_to_the_world_size(world):
    counts = transformer_counts(FLUX_DEV_TRANSFORMER, world)
    assert counts.shard * world == counts.gathered
    assert 0 <= counts.gathered - counts.parameters < 1e-3 * counts.parameters
    # 57 blocks + the root: the largest block is a double block (36 H² + 30 H + 512)
    h = 3072
    assert counts.largest_block >= 36 * h * h + 30 * h + 512


def test_live_bytes_counts_what_autograd_keeps_by_hand():
    """y = gelu(x W1ᵀ) W2ᵀ: the forward keeps h = x W1ᵀ and gelu(h) for the backward, and the
    output; checkpointed, only the output (its input is the caller's)."""
    batch, width, hidden = 4, 8, 32

    def mlp(checkpointed: bool) -> torch.nn.Module:
        module = torch.nn.Sequential(
            torch.nn.Linear(width, hidden, bias=False),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, width, bias=False),
        )
        if checkpointed:
            return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        return module

    for checkpointed, saved in ((False, 4 * (2 * batch * hidden + batch * width)), (True, 0)):
        saved += 4 * batch * width if checkpointed else 0  # the output
        for fake in (True, False):
            with memory._fake() if fake else torch.device("cpu"):
                module = mlp(checkpointed)
                x = torch.zeros(batch, width, requires_grad=True)
                tracker = LiveBytes([*module.parameters(), x])
                with tracker:
                    y = module(x)
                    assert tracker.live == saved, (checkpointed, fake)
                    y.sum().backward()
                    del y
                # what stays: the gradients of W1, W2 and x
                assert tracker.live == 4 * (2 * width * hidden + batch * width)


def test_fake_measurement_equals_a_real_cpu_run_of_the_tiny_transformer():
    """The estimate's measurement (fake tensors) against the same call on real CPU tensors."""
    config = plain(tiny_transformer(0))
    config_json = json.dumps(config, sort_keys=True)
    for policy in ("fp32", "fsdp-bf16", "autocast-bf16"):
        fake = memory.measure_transformer_call(config_json, policy, True, 2, 16, 8)
        dtype = memory._policy(policy).transformer_dtype
        torch.set_default_dtype(dtype)
        try:
            model = memory.flux_for_measurement(config_json, True)
        finally:
            torch.set_default_dtype(torch.float32)
        train_parameters(model, True, False)
        inputs = flux_inputs(config, 2, 16, 8)
        owned = [*model.parameters(), *(t for t in inputs.values() if t is not None)]
        real = run_transformer_call(model, inputs, policy, True, LiveBytes(owned))
        assert real == fake, policy
        assert fake.backward_peak > fake.saved > 0


def tiny_config(**changes) -> TrainConfig:
    config = load_train_config(REPO / "config" / "train-tiny.yaml")
    evaluation = config.evaluation.model_copy(update={"every": 0})
    return config.model_copy(update={"evaluation": evaluation, **changes})


TINY_MODELS = {
    "transformer": plain(tiny_transformer(0)),
    "vae": plain(tiny_vae(0)),
    "reward": TINY_CONFIG,
}


def tiny_estimate(world: int, **changes) -> memory.MemoryEstimate:
    config = tiny_config(**changes)
    return estimate(config, world, model_configs(config, **TINY_MODELS), text_tokens=8)


def test_sharded_states_scale_as_one_over_w_and_the_rest_does_not():
    one, two = tiny_estimate(1, batch_size=2), tiny_estimate(2, batch_size=2)
    counts = [transformer_counts(TINY_MODELS["transformer"], w) for w in (1, 2)]
    assert one.shards == 4 * counts[0].shard and two.shards == 4 * counts[1].shard
    assert two.shards == pytest.approx(one.shards / 2, rel=0.01)
    assert one.optimizer == 2 * one.shards and two.optimizer == 2 * two.shards
    assert one.vae == two.vae and one.reward == two.reward
    assert one.startup > two.startup


def test_gather_scopes_order_the_peaks():
    """Keeping the whole model gathered costs its compute-dtype bytes; per-block gathering
    holds a block, the prefetched next one and the one in flight."""
    deep = {**TINY_MODELS, "transformer": {**TINY_MODELS["transformer"], "num_layers": 4}}
    deep["transformer"]["num_single_layers"] = 8
    config = tiny_config(precision="fsdp-bf16")
    models = model_configs(config, **deep)
    peaks = {
        scope: estimate(config.model_copy(update={"gather_params": scope}), 2, models, 8)
        for scope in memory.gather_scopes()
    }
    params = transformer_counts(deep["transformer"], 2)
    full = 2 * (params.gathered + params.largest_block)
    per_block = 2 * (params.root + 3 * params.largest_block)
    assert peaks["forward"].phases["rollout"] < peaks["first_call"].phases["rollout"]
    assert peaks["rollout"].phases["rollout"] == peaks["first_call"].phases["rollout"]
    assert peaks["step"].gathered == full
    assert peaks["forward"].phases["rollout"] - peaks["step"].phases["rollout"] == per_block - full
    fp32 = estimate(config.model_copy(update={"precision": "fp32"}), 2, models, 8)
    assert fp32.gathered == 2 * peaks["first_call"].gathered


def test_evaluation_adds_its_metric_models():
    config = tiny_config()
    evaluation = config.evaluation.model_copy(
        update={"every": 1, "metrics": {"aesthetic": {}}, "batch_size": 2, "max_prompts": None}
    )
    watched = config.model_copy(update={"evaluation": evaluation})
    result = estimate(watched, 2, model_configs(watched, **TINY_MODELS), text_tokens=8)
    aesthetic = memory.published_metric_parameters("aesthetic")
    assert result.metrics == 4 * aesthetic  # CLIP ViT-L/14 + MLP in fp32
    assert result.evaluation > result.metrics
    assert result.peak >= result.evaluation


def test_paper_profile_fits_an_80_gb_gpu():
    config = load_train_config(REPO / "config" / "train-paper.yaml")
    result = estimate(config, 32)
    assert result.parameters == 11_901_408_320
    assert result.peak < memory.DEFAULT_GPU_BYTES
    assert result.shards == 4 * transformer_counts(FLUX_DEV_TRANSFORMER, 32).shard


def test_doctor_prints_the_estimate_and_fails_over_the_limit(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_workflow_config([])
    fits = Doctor(config)
    fits.train_config()
    row = next(row for row in fits.rows if row.area == "train")
    assert row.status == "ok"
    assert "fits the 80.0 GB GPU" in row.detail and "per rank at W=2" in row.detail
    tight = Doctor(config, gpu_memory=1000)
    tight.train_config()
    row = next(row for row in tight.rows if row.area == "train")
    assert row.status == "fail" and tight.failed
    assert "does not fit: peak" in row.detail and "> 1.0 KB GPU (given)" in row.detail
