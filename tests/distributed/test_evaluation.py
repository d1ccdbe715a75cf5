"""Held-out evaluation during training, and the collapse guard, under real torchrun + gloo."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from support import assert_ok, run_srpo
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from srpo.encode import encode_prompts
from srpo.train.evaluate import EXIT_COLLAPSED

pytestmark = pytest.mark.distributed

HELD_OUT = ["a cat sleeping on a sofa", "a castle in the clouds", "a robot playing chess"]
"""Three prompts over two ranks: rank 1 pads its one prompt to rank 0's two."""


@pytest.fixture(scope="module")
def held_out(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("held_out")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(HELD_OUT) + "\n")
    return encode_prompts(str(tiny_models / "flux"), prompts, folder / "embeddings", 32, 4)


def watched(models: Path) -> dict[str, dict[str, str]]:
    """Aesthetic and PickScore: metrics the tiny hpsv2-rewarded run is not trained on."""
    aesthetic = models / "aesthetic"
    return {
        "aesthetic": {
            "clip_checkpoint": str(aesthetic / "ViT-L-14.pt"),
            "model_config": str(aesthetic / "clip_config.json"),
            "mlp_checkpoint": str(aesthetic / "sac+logos+ava1-l14-linearMSE.pth"),
        },
        "pickscore": {"model_path": str(models / "pickscore")},
    }


def test_held_out_metrics_are_logged_without_changing_training(
    write_config, tiny_models, held_out, tmp_path
):
    """Every 2 steps (and at step 0) the held-out images are scored into eval.csv and
    TensorBoard; the evaluation leaves the trained weights bit for bit as without it."""
    evaluation = {
        "every": 2,
        "embeddings": str(held_out),
        "steps": 3,
        "metrics": watched(tiny_models),
    }
    assert_ok(run_srpo(write_config("plain", max_steps=3), 2))
    result = run_srpo(write_config("watched", max_steps=3, evaluation=evaluation), 2)
    assert_ok(result)
    assert "eval step 2: train_reward=" in result.stdout

    frame = pd.read_csv(tmp_path / "watched" / "eval.csv")
    assert frame["step"].tolist() == [0, 2, 3]
    assert set(frame.columns) >= {"train_reward", "aesthetic", "pickscore", "images"}
    assert frame["images"].tolist() == [3, 3, 3]
    assert all(
        math.isfinite(v) for v in frame[["train_reward", "aesthetic", "pickscore"]].values.flat
    )
    assert frame["pickscore"].nunique() == 3, "the held-out scores do not follow the model"

    events = EventAccumulator(str(tmp_path / "watched" / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("eval/aesthetic")]
    assert steps == [0, 2, 3]

    want = load_file(str(tmp_path / "plain" / "model" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(tmp_path / "watched" / "model" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_held_out_batches_of_one_give_the_figures_of_one_batch(
    write_config, tiny_models, held_out, tmp_path
):
    """evaluation.batch_size 1 on two ranks under FSDP2: two chunks each, rank 1's second all
    padding (rolled out all the same, as every rank runs the same forwards), and eval.csv holds
    the figures of sampling each rank's prompts in one batch. The metrics score 8-bit pictures,
    where a last-bit difference of a batched matmul can move a pixel by one level, so they get
    a looser tolerance than the training reward, which scores the float images."""
    frames = {}
    for size in (8, 1):
        evaluation = {
            "every": 1,
            "embeddings": str(held_out),
            "steps": 3,
            "metrics": watched(tiny_models),
            "batch_size": size,
        }
        assert_ok(run_srpo(write_config(f"batch{size}", max_steps=1, evaluation=evaluation), 2))
        frames[size] = pd.read_csv(tmp_path / f"batch{size}" / "eval.csv")
    assert frames[1]["step"].tolist() == frames[8]["step"].tolist() == [0, 1]
    for columns, rtol in ((["train_reward"], 1e-5), (["aesthetic", "pickscore"], 1e-4)):
        pd.testing.assert_frame_equal(frames[1][columns], frames[8][columns], rtol=rtol, atol=0)


def gameable_rewards(models: Path, out: Path) -> tuple[Path, Path]:
    """Two HPSv2.1 checkpoints in the real layout made from the tiny one, whose text tower maps
    every prompt to one vector: `reward` scores image·t whatever the prompt (so one direction of
    the image inflates it), `judge` scores image·(−t) and so falls exactly as it is gamed."""
    state = torch.load(models / "hpsv2" / "HPS_v2.1_compressed.pt", weights_only=False)[
        "state_dict"
    ]
    width = state["ln_final.bias"].shape[0]
    direction = torch.linspace(-1.0, 1.0, width)
    paths = []
    for name, sign in (("reward", 1.0), ("judge", -1.0)):
        crafted = dict(state)
        crafted["ln_final.weight"] = torch.zeros(width)
        crafted["ln_final.bias"] = sign * direction
        (out / name).mkdir(parents=True)
        paths.append(out / name / "HPS_v2.1_compressed.pt")
        torch.save({"state_dict": crafted}, paths[-1])
    return paths[0], paths[1]


def test_gameable_reward_trips_the_collapse_guard(write_config, tiny_models, held_out, tmp_path):
    """Training on a reward one image direction inflates, watched by a judge that disagrees:
    the guard stops the run after a checkpoint, exit 4, naming the metric and both values."""
    reward, judge = gameable_rewards(tiny_models, tmp_path / "crafted")
    model_config = str(tiny_models / "hpsv2" / "open_clip_config.json")
    evaluation = {
        "every": 1,
        "embeddings": str(held_out),
        "steps": 3,
        "metrics": {"hpsv2": {"checkpoint": str(judge), "model_config": model_config}},
        "collapse": {"margins": {"hpsv2": 0.002}, "stop": True},
    }
    config = write_config(
        "hacked",
        max_steps=8,
        reward={"checkpoint": str(reward)},
        optim={"learning_rate": 3e-3},
        evaluation=evaluation,
    )
    result = run_srpo(config, 2)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"(exitcode: {EXIT_COLLAPSED})" in result.stderr, "torchrun reports the workers' status"
    frame = pd.read_csv(tmp_path / "hacked" / "eval.csv")
    step = int(frame["step"].iloc[-1])
    assert step < 8, "the guard stopped nothing"
    assert f"reward hacking suspected at step {step}: hpsv2 fell from" in result.stderr
    assert "(evaluation.collapse.stop)" in result.stderr
    assert (tmp_path / "hacked" / "checkpoints" / f"step-{step:08d}").is_dir()
    assert not (tmp_path / "hacked" / "model").exists()
    best = frame.iloc[frame["hpsv2"].iloc[:-1].idxmax()]
    assert frame["hpsv2"].iloc[-1] < best["hpsv2"] - 0.002
    assert frame["train_reward"].iloc[-1] > best["train_reward"]
