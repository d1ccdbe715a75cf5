"""Training with a mix of rewards raises the held-out mix reward (HPSv3: tests/metric_envs)."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from support import assert_ok, run_srpo
from test_learning import HELD_OUT, NOISE_SEEDS, HeldOutReward

from srpo.config import load_train_config
from srpo.encode import encode_prompts
from srpo.rewards import MixReward, load_reward

pytestmark = pytest.mark.distributed

MIX = {"hpsv2": 1.0, "pickscore": 0.5}


@pytest.mark.slow
def test_mix_held_out_reward_rises(write_config, tiny_models, tmp_path):
    """test_held_out_reward_rises' protocol with reward {hpsv2: 1.0, pickscore: 0.5}: the held-out
    metric is the same mix, each part on its own towers."""
    reward = {"kind": "mix", "mix": MIX, "model_path": str(tiny_models / "pickscore")}
    config = write_config("mix", max_steps=12, optim={"learning_rate": 3e-3}, reward=reward)
    assert_ok(run_srpo(config, None))
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("\n".join(HELD_OUT) + "\n")
    cache = encode_prompts(str(tiny_models / "flux"), prompts, tmp_path / "held_out", 32, 8)
    evaluate = HeldOutReward(tiny_models, cache)
    settings = load_train_config(config).reward
    evaluate.reward = load_reward("mix", **settings.load_arguments())
    assert isinstance(evaluate.reward, MixReward) and evaluate.reward.weights == MIX

    base = FluxTransformer2DModel.from_pretrained(
        str(tiny_models / "flux"), subfolder="transformer"
    )
    trained = FluxTransformer2DModel.from_pretrained(
        str(tmp_path / "mix" / "model"), subfolder="transformer"
    )
    before = torch.tensor([evaluate(base, seed) for seed in NOISE_SEEDS])
    after = torch.tensor([evaluate(trained, seed) for seed in NOISE_SEEDS])
    seed_noise = float(before.std())
    gain = float(after.mean() - before.mean())
    assert gain > 5 * seed_noise, f"gain {gain:.4f} vs seed-to-seed std {seed_noise:.4f}"
    assert bool((after > before).all()), (before, after)
