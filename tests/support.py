"""Helpers shared by tests: tiny training configs and `torchrun -m srpo train` launches."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import yaml
from diffusers import FluxTransformer2DModel

from srpo.algorithm import euler_rollout, sigma_schedule
from srpo.encode import EmbeddingCache
from srpo.flux import FrozenVAE, LatentGeometry, load_vae, make_velocity, vae_scale_factor
from srpo.train.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
EVAL_CSV = """prompt_id,style,prompt
7,anime,a red fox sitting in the snow
3,photo,"a lighthouse on a cliff, at sunset"
12,paintings,portrait of an old fisherman
0,concept-art,a futuristic city skyline at night
5,photo,a small wooden boat on a calm lake
1,anime,a girl reading a book under a tree
9,paintings,mountains covered in fog at dawn
"""
"""Evaluation prompts as `srpo sample` reads them: ids out of order, a quoted comma."""
TRAIN_PROMPTS = [
    "a red fox sitting in the snow",
    "a lighthouse on a cliff at sunset",
    "portrait of an old fisherman",
    "a bowl of ripe oranges on a table",
    "a futuristic city skyline at night",
    "a small wooden boat on a calm lake",
    "a girl reading a book under a tree",
    "mountains covered in fog at dawn",
]


def tiny_config(models: Path, cache: Path, output_dir: Path, **overrides) -> dict:
    """The tiny training config: 64×64 px, fp32, HPSv2-layout reward."""
    config = {
        "base_model": str(models / "flux"),
        "embeddings": str(cache),
        "output_dir": str(output_dir),
        "reward": {
            "kind": "hpsv2",
            "checkpoint": str(models / "hpsv2" / "HPS_v2.1_compressed.pt"),
            "model_config_path": str(models / "hpsv2" / "open_clip_config.json"),
        },
        "srpo": {},
        "optim": {"learning_rate": 1e-3},
        "batch_size": 2,
        "max_steps": 3,
        "height": 64,
        "width": 64,
        "rollout_steps": 4,
        "seed": 7,
        "precision": "fp32",
        "export_dtype": "float32",
        "checkpoint_every": 100,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    return config


def srpo_command(
    config: Path, nproc: int | None, *extra: str, torchrun_options: tuple[str, ...] = ()
) -> list[str]:
    """`torchrun [OPTIONS] --nproc-per-node N -m srpo train …` as users launch it; nproc None:
    no torchrun."""
    train = ["-m", "srpo", "train", "--config", str(config), *extra]
    if nproc is None:
        return [sys.executable, *train]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, *torchrun_options, "--nproc-per-node", str(nproc), "--standalone", *train]


def run_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra}


WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles")


def copy_workflow(folder: Path, *extra: str) -> Path:
    """The workflow files (and `extra` ones) copied into `folder`, so a run writes its results/
    there as `snakemake` does at the repository root; links stay links."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*WORKFLOW_FILES, *extra):
        source = REPO / name
        if source.is_symlink():
            (folder / name).symlink_to(os.readlink(source))
        elif source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder / name)
    return folder


MIX_REWARD = {
    "kind": "mix",
    "mix": {"hpsv2": 1.0, "hpsv3": 0.5},
    "hpsv3_checkpoint": "results/tiny/models/hpsv3/HPSv3.safetensors",
    "hpsv3_config": "results/tiny/models/hpsv3/HPSv3_tiny.yaml",
}
"""The tiny default's reward with the tiny HPSv3 added: its models need the hpsv3 environment."""


def mix_training(folder: Path, **training: object) -> str:
    """In a workflow copy, config/mix.yaml: the tiny default trained on the reward mix
    {hpsv2: 1.0, hpsv3: 0.5} (config/train-mix.yaml, with `training`'s keys); its file name."""
    config = folder / "config"
    settings = yaml.safe_load((config / "train-tiny.yaml").read_text())
    settings["reward"] = {**settings["reward"], **MIX_REWARD}
    (config / "train-mix.yaml").write_text(yaml.safe_dump({**settings, **training}))
    workflow = yaml.safe_load((config / "config.yaml").read_text())
    workflow["train"]["config"] = "config/train-mix.yaml"
    (config / "mix.yaml").write_text(yaml.safe_dump(workflow, sort_keys=False))
    return "config/mix.yaml"


def venv_env(**extra: str) -> dict[str, str]:
    """`run_env` with this environment's bin/ (snakemake, srpo, srpo-ENV) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return run_env(PATH=f"{bin_dir}:{run_env()['PATH']}", **extra)


def snakemake(folder: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in `folder`, run as the users' shell would find it (venv_env)."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), *args],
        cwd=folder,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_srpo(
    config: Path, nproc: int | None, *extra: str, **env: str
) -> subprocess.CompletedProcess:
    """Run a training launch to completion, capturing its output."""
    return subprocess.run(
        srpo_command(config, nproc, *extra),
        cwd=REPO,
        env=run_env(**env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def slow_saves(seconds: float) -> dict[str, str]:
    """Environment of a launch whose rank 0 waits `seconds` between writing a checkpoint and
    publishing it (tests/distributed/slow_save): a window to kill it in, or a slow save."""
    hook = str(REPO / "tests" / "distributed" / "slow_save")
    return {"PYTHONPATH": hook, "SRPO_TEST_SAVE_PAUSE_S": str(seconds)}


def poisoned_cache(index: Path, folder: Path, numbers: list[int]) -> Path:
    """A copy of the embedding cache `index` in `folder` where prompts `numbers` have NaN T5
    embeddings: a step that trains on one of them has a NaN loss on the rank that holds it,
    as with a corrupt cache. Returns the copy's index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(index.parent, folder, dirs_exist_ok=True)
    for entry in json.loads(index.read_text())["shards"]:
        start, stop, path = int(entry["start"]), int(entry["stop"]), index.parent / entry["file"]
        with safe_open(str(path), framework="pt") as shard:
            names = shard.keys()
            tensors = {name: shard.get_tensor(name) for name in names}
            metadata = shard.metadata()
        for number in numbers:
            if start <= number < stop:
                tensors["prompt_embeds"][number - start] = float("nan")
        save_file(tensors, str(folder / entry["file"]), metadata=metadata)
    return folder / index.name


def start_srpo(
    config: Path, nproc: int | None, torchrun_options: tuple[str, ...] = (), **env: str
) -> subprocess.Popen:
    """Start a training launch in its own session (so a test can kill the whole group)."""
    return subprocess.Popen(
        srpo_command(config, nproc, torchrun_options=torchrun_options),
        cwd=REPO,
        env=run_env(**env),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_same_update(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> None:
    """Two trainings from `base` moved every weight alike: no element differs by more than 1%
    of the largest update, and something moved.

    Not a fixed 1e-6: AdamW turns an element whose gradient is near its eps into an update that
    last-bit rounding (another batch layout or order of the gradient sum) changes; measured
    1.6e-6 out of 2e-3 updates. Another sample assignment moves whole tensors by the update's
    size, a hundred times the bound."""
    assert got.keys() == want.keys() == base.keys()
    largest = max(float((want[key] - base[key]).abs().max()) for key in base)
    assert largest > 0, "training changed nothing"
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=largest / 100, msg=key)


HELD_OUT = [
    "a cat sleeping on a sofa",
    "a castle in the clouds",
    "an astronaut riding a horse",
    "a field of sunflowers",
    "a stone bridge over a river",
    "a robot playing chess",
]
"""Prompts no training run sees: the "held-out metric rises" tests score rollouts of them."""
NOISE_SEEDS = range(8)


class HeldOutRollouts:
    """8-step rollouts (guidance 3.5, 64 px) of a transformer on the held-out prompts of a text
    cache, decoded, for one noise seed: what the "held-out metric rises" tests score."""

    def __init__(self, models: Path, cache: Path) -> None:
        self.cache = EmbeddingCache(cache)
        vae = load_vae(str(models / "flux"))
        self.geometry = LatentGeometry(64, 64, vae_scale_factor(vae))
        self.vae = FrozenVAE(vae, self.geometry)

    @torch.no_grad()
    def images(self, transformer: torch.nn.Module, seed: int) -> tuple[torch.Tensor, list[str]]:
        cond = self.cache.get(list(range(len(self.cache))))
        velocity = make_velocity(
            transformer, self.geometry, cond.prompt_embeds, cond.pooled_prompt_embeds,
            cond.text_ids, 3.5, True,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.geometry.token_shape(len(self.cache)), generator=generator)
        images = self.vae.decode(euler_rollout(velocity, noise, sigma_schedule(8, 3.0)))
        return images, cond.captions


def assert_held_out_gain(score, models: Path, trained: Path) -> None:
    """`score(transformer, seed)` of the transformer trained into `trained` beats the base
    model's for every noise seed, by a mean gain above 5 seed-to-seed deviations of the base."""
    base_model = FluxTransformer2DModel.from_pretrained(
        str(models / "flux"), subfolder="transformer"
    )
    trained_model = FluxTransformer2DModel.from_pretrained(str(trained), subfolder="transformer")
    before = torch.tensor([score(base_model, seed) for seed in NOISE_SEEDS])
    after = torch.tensor([score(trained_model, seed) for seed in NOISE_SEEDS])
    seed_noise = float(before.std())
    gain = float(after.mean() - before.mean())
    assert gain > 5 * seed_noise, f"gain {gain:.6g} vs seed-to-seed std {seed_noise:.6g}"
    assert bool((after > before).all()), (before, after)


def directional_derivatives(
    reward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    step: float,
    count: int = 3,
    seed: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(autograd, central differences with `step`) of Σ reward(images) along `count` random unit
    directions of the images: the finite-difference check of every reward's gradient."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn((count, *images.shape), generator=generator, dtype=images.dtype)
    directions /= directions.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    pixels = images.clone().requires_grad_(True)
    reward(pixels).sum().backward()
    analytic = torch.stack([(pixels.grad * direction).sum() for direction in directions])
    with torch.no_grad():
        numeric = torch.stack(
            [
                (reward(images + step * d).sum() - reward(images - step * d).sum()) / (2 * step)
                for d in directions
            ]
        )
    return analytic, numeric


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure or Slurm would.

    torchrun starts its workers in sessions of their own, so killing its group is not enough.
    """
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue


def checkpoints(run_dir: Path) -> Checkpointer:
    return Checkpointer(run_dir / "checkpoints", keep_last=3, rank=0)


def terminate_once_resumed(process: subprocess.Popen) -> str:
    """SIGTERM to torchrun as soon as rank 0 reports its resume; then wait for the end."""
    for line in process.stdout:
        if line.startswith("resumed from"):
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=300)
    return err
