"""Training with the HPSv3 reward, end to end on tiny models, in the hpsv3 environment.

HPSv3 needs transformers 4.45 (.venv-hpsv3), so the training job runs there, launched as the
workflow's `torchrun-hpsv3 … -m srpo train` does: that environment's interpreter running
`-m torch.distributed.run`. The FLUX models and text
caches are built by the main environment's `srpo` (transformers 5 writes them), as the workflow
does. Run: .venv-hpsv3/bin/python -m pytest tests/metric_envs/test_hpsv3_training.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("hpsv3.inference", reason="run in .venv-hpsv3: bash envs/metric-env.sh hpsv3")

from support import (
    HELD_OUT,
    REPO,
    TRAIN_PROMPTS,
    HeldOutRollouts,
    assert_held_out_gain,
    assert_ok,
    run_env,
    tiny_config,
)

from srpo.config import HPSV3_SCALE
from srpo.flux import LatentGeometry
from srpo.rewards import hpsv3, load_reward

pytestmark = pytest.mark.filterwarnings(
    # hpsv3 runs its head under torch.autocast("cuda"), which warns and does nothing on CPU.
    "ignore:CUDA is not available:UserWarning",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
)
MAIN_SRPO = str(REPO / ".venv" / "bin" / "srpo")


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900
    )


def encode(models: Path, prompts: list[str], out_dir: Path) -> Path:
    """A text cache of `prompts` (32 T5 tokens), written by the main environment's `srpo`."""
    listing = out_dir.with_suffix(".txt")
    listing.write_text("\n".join(prompts) + "\n")
    assert_ok(
        run(
            MAIN_SRPO, "encode", "--base-model", str(models / "flux"), "--prompts", str(listing),
            "--out-dir", str(out_dir), "--max-sequence-length", "32", "--batch-size", "8",
        )
    )  # fmt: skip
    return out_dir / "index.json"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main environment's tiny FLUX and HPSv2 (`srpo make-tiny`), plus a tiny HPSv3."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    assert_ok(run(MAIN_SRPO, "make-tiny", str(folder), "--part", "flux", "--part", "hpsv2"))
    hpsv3.build_tiny(folder / "hpsv3")
    return folder


@pytest.fixture(scope="module")
def cache(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training prompts' text cache."""
    return encode(models, TRAIN_PROMPTS, tmp_path_factory.mktemp("cache") / "train")


def hpsv3_paths(models: Path) -> dict[str, Path]:
    folder = models / "hpsv3"
    return {"checkpoint": folder / hpsv3.CHECKPOINT_NAME, "config": folder / hpsv3.CONFIG_NAME}


class HeldOutScore(HeldOutRollouts):
    """tests/distributed/test_learning.py's protocol with the HPSv3 score: mean μ(image, caption)
    of rollouts on held-out prompts for one noise seed, one image per call (transformers 4.45
    masks a batch's vision attention as one sequence: one call of six images takes twice as long
    as six calls of one).

    μ, not the SRP reward at w = 0: on the random tiny HPSv3 the control-word part
    μ(x, p) − μ(x, n) moves by under 4 seed-to-seed deviations in 20 updates (measured), while μ,
    HPSv3's published score and what the reward's w·μ(x, p) term raises, moves by about 15."""

    def __init__(self, models: Path, cache: Path) -> None:
        super().__init__(models, cache)
        self.reward = load_reward("hpsv3", **hpsv3_paths(models), scale=HPSV3_SCALE)

    @torch.no_grad()
    def __call__(self, transformer: torch.nn.Module, seed: int) -> float:
        images, captions = self.images(transformer, seed)
        scores = [
            float(self.reward.score(image[None], [caption]))
            for image, caption in zip(images, captions, strict=True)
        ]
        return sum(scores) / len(scores)


def test_hpsv3_held_out_reward_rises(models: Path, cache: Path, tmp_path: Path) -> None:
    """Updates with the HPSv3 reward under torchrun in this environment raise the held-out HPSv3
    score beyond seed-to-seed noise, as test_held_out_reward_rises asks of HPSv2.1 training."""
    reward = {
        "kind": "hpsv3",
        **{f"hpsv3_{key}": str(path) for key, path in hpsv3_paths(models).items()},
    }
    settings = tiny_config(models, cache, tmp_path / "learn", max_steps=20)
    settings.update(reward=reward, optim={"learning_rate": 1e-2})
    config = tmp_path / "learn.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert_ok(
        run(
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
            "--standalone", "-m", "srpo", "train", "--config", str(config),
        )
    )  # fmt: skip
    evaluate = HeldOutScore(models, encode(models, HELD_OUT, tmp_path / "held_out"))
    assert_held_out_gain(evaluate, models, tmp_path / "learn" / "model")


def test_main_environment_says_where_to_train(models: Path, cache: Path, tmp_path: Path) -> None:
    """`srpo train` with an HPSv3 reward in the main environment: one line naming the launch."""
    settings = tiny_config(models, cache, tmp_path / "out")
    settings["reward"] = {
        "kind": "hpsv3",
        "hpsv3_checkpoint": str(hpsv3_paths(models)["checkpoint"]),
    }
    config = tmp_path / "hpsv3.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = run(MAIN_SRPO, "train", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: hpsv3.inference cannot be imported here (No module named 'hpsv3'); run with "
        f"{hpsv3.TRAIN_COMMAND} after bash envs/metric-env.sh hpsv3"
    ]


def test_flux_helpers_of_this_diffusers() -> None:
    """diffusers 0.31 here halves inside its helpers (srpo.flux.HALVING_HELPERS): the image ids
    and the unpacking are still those of the main environment's diffusers."""
    geometry = LatentGeometry(64, 48, 8)  # latents 8×6, tokens 4×3
    rows, columns = torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="ij")
    expected = torch.stack([torch.zeros(12), rows.flatten(), columns.flatten()], dim=1)
    assert torch.equal(geometry.image_ids(torch.device("cpu"), torch.float32), expected)
    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(geometry.unpack(geometry.pack(latents)), latents)
