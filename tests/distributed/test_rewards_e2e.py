"""Training with a mix of rewards raises the held-out mix reward (HPSv3: tests/metric_envs)."""

import pytest
from support import HELD_OUT, assert_held_out_gain, assert_ok, run_srpo
from test_learning import HeldOutReward

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

    assert_held_out_gain(evaluate, tiny_models, tmp_path / "mix" / "model")
