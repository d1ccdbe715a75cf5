"""The benchmark compares like with like: same loss as the baseline, FLOPs as counted, and the
speed-ups keep the objective's bits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
import yaml
from support import REPO, run_env
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

from benchmarks.flops import counted_flops, train_step_flops, transformer_forward_flops
from benchmarks.models import ensure_models
from benchmarks.run import app as bench_app
from benchmarks.suites import ModelSpec, get_suite
from benchmarks.train_step import run
from srpo.config import load_train_config
from srpo.runtime.distributed import DistributedContext
from srpo.train.step import Trainer


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    models = ensure_models(ModelSpec("tiny", real_width=False), root / "models")
    config = {
        "base_model": str(models.flux),
        "embeddings": str(models.embeddings),
        "output_dir": str(root / "train"),
        "reward": {
            "kind": "hpsv2",
            "checkpoint": str(models.reward_checkpoint),
            "model_config_path": str(models.reward_config),
        },
        "batch_size": 2,
        "height": 64,
        "width": 64,
        "rollout_steps": 3,
        "precision": "fp32",
        "optim": {"learning_rate": 1e-3},
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_literal_baseline_computes_our_loss(bench_config: Path, tmp_path: Path):
    """Same prompts, noise, mids and formulas: the two steps differ only in how they run."""
    records = {}
    for variant in ("ours", "literal-no-anomaly"):
        out = tmp_path / f"{variant}.json"
        # a warm-up step with a 1-step rollout, as `python -m benchmarks` runs it, then 2
        # measured steps: a variant that ignored the short rollout would differ from step 1;
        # step 3's loss depends on two updates
        run(variant, bench_config, out, 1, 2, 1)
        records[variant] = json.loads(out.read_text())["records"]
    pairs = zip(records["ours"], records["literal-no-anomaly"], strict=True)
    for step, (ours, literal) in enumerate(pairs, start=1):
        # step 1 is the same arithmetic; later steps follow AdamW updates whose rounding differs
        # (fused kernel vs per-tensor loop, FSDP2 vs FSDP1 gradient norm)
        tolerance = 1e-6 if step == 1 else 1e-4
        for key in ("loss/denoise", "loss/inversion", "reward/denoise", "reward/inversion"):
            assert ours[key] == pytest.approx(literal[key], rel=tolerance, abs=1e-7), (step, key)
    # the updates moved the model: a baseline that never stepped would fail the third step
    first, third = records["ours"][0], records["ours"][2]
    assert first["loss/denoise"] != third["loss/denoise"]
    # and the warm-up's rollout was the short one: the config's 3 steps give another x₀
    run("ours", bench_config, tmp_path / "full-warmup.json", 1, 1)
    full = json.loads((tmp_path / "full-warmup.json").read_text())["records"][0]
    assert full["loss/denoise"] != first["loss/denoise"]


def test_literal_baseline_differs_when_its_math_does(bench_config: Path, tmp_path: Path):
    """The comparison can fail: another reward threshold gives the baseline another loss."""
    config = load_train_config(bench_config).to_dict()
    config["srpo"] = {"reward_threshold": 0.9}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config))
    run("literal-no-anomaly", other, tmp_path / "other.json", 0, 1)
    run("ours", bench_config, tmp_path / "ours.json", 0, 1)
    changed = json.loads((tmp_path / "other.json").read_text())["records"][0]["loss/denoise"]
    ours = json.loads((tmp_path / "ours.json").read_text())["records"][0]["loss/denoise"]
    assert changed == pytest.approx(ours + 0.2 / 2, rel=1e-5)  # relu(t − r)/2, r < 0.7


def test_lora_variant_trains_adapters_on_the_same_objective(bench_config: Path, tmp_path: Path):
    """The LoRA row measures the same step: its adapters start as a zero update (B = 0), so
    step 1's losses are the full run's exactly, with a fraction of the parameters trainable."""
    figures = {}
    for variant in ("ours", "ours-lora"):
        run(variant, bench_config, tmp_path / f"{variant}.json", 0, 1)
        figures[variant] = json.loads((tmp_path / f"{variant}.json").read_text())
    full, lora = figures["ours"], figures["ours-lora"]
    assert full["trainable_parameters"] == full["parameters"]
    assert 0 < lora["trainable_parameters"] < full["parameters"] / 5
    assert lora["parameters"] == full["parameters"] + lora["trainable_parameters"]
    for key in ("loss/denoise", "loss/inversion"):
        assert lora["records"][0][key] == full["records"][0][key], key


def _trained_state(
    config_path: Path, gather_params: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, torch.Tensor], int]:
    """The weights after two steps, and how many all-gathers the first block issued in the
    second (counted where FSDP2 issues them: an unshard that starts a gather; a world of one
    gathers by reference, without the collective's trace event)."""
    config = load_train_config(config_path, {"gather_params": gather_params})
    issued = {}
    unshard = FSDPParamGroup.unshard

    def counted(group: FSDPParamGroup, *args, **kwargs):
        pending = group._all_gather_result
        unshard(group, *args, **kwargs)
        if pending is None and group._all_gather_result is not None:
            issued[group] = issued.get(group, 0) + 1

    monkeypatch.setattr(FSDPParamGroup, "unshard", counted)
    with DistributedContext.from_environment() as ctx:
        torch.manual_seed(0)
        trainer = Trainer(config, ctx)
        phases = [trainer.train_step()]
        issued.clear()
        phases.append(trainer.train_step())
        block = trainer.model.transformer_blocks[0]._get_fsdp_state()._fsdp_param_group
        state = {k: v.full_tensor().clone() for k, v in trainer.model.state_dict().items()}
    for metrics in phases:
        assert metrics["time/rollout_s"] > 0 and metrics["time/backward_s"] > 0
    return state, issued.get(block, 0)


def test_gathering_parameters_once_keeps_every_bit(
    bench_config: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each scope's all-gathers of a block in a step with 2 samples on the rank (one fused
    call each) and 3 rollout steps (batched over both samples), and the same weights."""
    expected_gathers = {
        "forward": 3 + 2 + 2,  # each rollout forward; each call's forward and backward
        "rollout": 1 + 1 + 2,  # rollout + call 1's forward; call 1's backward; call 2
        "first_call": 1 + 2,  # rollout + all of call 1; call 2's forward and backward
        "step": 1,
    }
    regathered, gathers = _trained_state(bench_config, "forward", monkeypatch)
    assert gathers == expected_gathers["forward"]
    for scope in ("rollout", "first_call", "step"):
        kept, gathers = _trained_state(bench_config, scope, monkeypatch)
        assert gathers == expected_gathers[scope], scope
        assert kept.keys() == regathered.keys()
        for name, tensor in kept.items():
            assert torch.equal(tensor, regathered[name]), (scope, name)


def test_forward_flop_formula_matches_torch_count():
    """The stated formula against torch's own count of every matmul and attention call."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    config = {
        "patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 3,
        "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 96,
        "pooled_projection_dim": 48, "guidance_embeds": True, "axes_dims_rope": (8, 12, 12),
    }  # fmt: skip
    model = FluxTransformer2DModel(**config)
    image_tokens, text_tokens = 36, 20
    counted = counted_flops(
        model,
        hidden_states=torch.zeros(1, image_tokens, 64),
        encoder_hidden_states=torch.zeros(1, text_tokens, 96),
        pooled_projections=torch.zeros(1, 48),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 6, 6, "cpu", torch.float32),
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )
    formula = transformer_forward_flops(config, image_tokens, text_tokens)["total"]
    assert formula == pytest.approx(counted, rel=1e-3)


def test_train_step_flops_by_hand():
    # 25 rollout forwards + 2 branches × (forward + backward 2F + recompute F) + VAE/reward
    assert train_step_flops(10.0, 25, True, 3.0, 1.0) == 25 * 10 + 2 * (40 + 2 * 4)
    assert train_step_flops(10.0, 25, False, 0.0, 0.0) == 25 * 10 + 2 * 30


def test_suites_are_complete():
    for name in ("cpu", "gpu"):
        for size in ("smoke", "full"):
            suite = get_suite(name, size)
            assert suite.headline in {spec.name for spec in suite.models}
    assert get_suite("gpu", "full").device == "cuda"
    with pytest.raises(ValueError, match="--suite"):
        get_suite("tpu", "full")


def test_one_entry_point_explains_every_option():
    """`python -m benchmarks` (from the checkout) is the benchmarks' only entry: its --help
    explains every option, and `srpo` has no bench command reaching into the checkout."""
    from typer.testing import CliRunner

    from srpo.cli import app as srpo_app

    command = [sys.executable, "-m", "benchmarks", "--help"]
    env = run_env(COLUMNS="200", TERM="dumb")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "Usage: python -m benchmarks [OPTIONS]" in text
    options = [p for p in typer.main.get_command(bench_app).params if p.name != "help"]
    assert sorted(p.name for p in options) == ["out_dir", "size", "suite"]
    for option in options:
        assert option.help and option.opts[0] in text and " ".join(option.help.split()) in text
    assert "720 px training, 1024 px sampling" in text
    assert CliRunner().invoke(srpo_app, ["bench", "--help"]).exit_code == 2
