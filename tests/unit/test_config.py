"""Config validation: every mistake is one line naming the file and the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO, run_env

from srpo.config import load_train_config
from srpo.io import InputError

MINIMAL = {"base_model": "m", "embeddings": "e/index.json", "output_dir": "o"}


def write(tmp_path, payload) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(payload) if isinstance(payload, dict) else payload)
    return path


def test_defaults_are_the_paper_setting(tmp_path):
    config = load_train_config(write(tmp_path, MINIMAL))
    assert (config.batch_size, config.max_steps, config.height, config.width) == (32, 19, 720, 720)
    assert (config.rollout_steps, config.rollout_guidance, config.train_guidance) == (25, 1.0, 3.5)
    assert config.optim.learning_rate == 5e-6 and config.optim.max_grad_norm == 0.1
    assert config.optim.betas == (0.9, 0.999) and config.optim.weight_decay == 1e-4
    assert config.seed == 42 and config.reward.kind == "hpsv2"
    assert config.settings().groundtruth_ratio == 0.9


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({**MINIMAL, "batch_size": "many"}, "batch_size: Input should be a valid integer"),
        ({**MINIMAL, "batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
        ({**MINIMAL, "height": 100}, "height: Input should be a multiple of 16"),
        ({**MINIMAL, "learning_rate": 1.0}, "learning_rate: unknown key"),
        ({**MINIMAL, "optim": {"learning_rate": -1}}, "optim.learning_rate: Input should be"),
        ({"base_model": "m", "embeddings": "e"}, "output_dir: required key is missing"),
        ({**MINIMAL, "reward": {"kind": "clip"}}, "reward.kind: Input should be 'hpsv2'"),
        ({**MINIMAL, "reward": {"kind": "hpsv3"}}, "reward.hpsv3_checkpoint: required for kind"),
        ({**MINIMAL, "reward": {"kind": "mix"}}, "reward.mix: required for kind 'mix'"),
        ({**MINIMAL, "reward": {"mix": {"hpsv2": 1}}}, "reward.mix: only for kind 'mix', not"),
        (
            {**MINIMAL, "reward": {"kind": "mix", "mix": {"hpsv2": 1, "clip": 1}}},
            "reward.mix: unknown kind(s) ['clip']; expected some of ['hpsv2', 'pickscore'",
        ),
        ({**MINIMAL, "reward": {"kind": "mix", "mix": {}}}, "reward.mix: unknown kind(s) []"),
        (
            {**MINIMAL, "reward": {"kind": "mix", "mix": {"hpsv2": 1.0, "pickscore": 0}}},
            "reward.mix: weights must be positive and finite",
        ),
        (
            {
                **MINIMAL,
                "reward": {
                    "kind": "mix",
                    "mix": {"hpsv2": 1.0, "pickscore": 0.5},
                    "checkpoint": "c",
                },
            },
            "reward.model_path: required for kind 'pickscore'",
        ),
        ({**MINIMAL, "reward": {"hpsv3_scale": 0}}, "reward.hpsv3_scale: Input should be greater"),
        ({**MINIMAL, "srpo": {"groundtruth_ratio": 2}}, "srpo: SRPOSettings.groundtruth_ratio"),
        ({**MINIMAL, "srpo": {"k": 1}}, "srpo: unknown key(s) ['k']"),
        ({**MINIMAL, "mode": "sometimes"}, "mode: Input should be 'online' or 'offline'"),
        ({**MINIMAL, "param_dtype": "bfloat16"}, "param_dtype: unknown key"),
        ({**MINIMAL, "precision": "bf16"}, "precision: Input should be 'fsdp-bf16', 'autocast"),
        ({**MINIMAL, "lora": {"rank": 0}}, "lora.rank: Input should be greater than or equal to 1"),
        ({**MINIMAL, "lora": {"alpha": -1}}, "lora.alpha: Input should be greater than 0"),
        ({**MINIMAL, "lora": {"dropout": 0.1}}, "lora.dropout: unknown key"),
        ({**MINIMAL, "lora": {"target_modules": []}}, "lora.target_modules: Tuple should have"),
        ({**MINIMAL, "lora": "yes"}, "lora: Input should be a valid dictionary"),
    ],
)
def test_bad_values_name_the_key(tmp_path, payload, message):
    path = write(tmp_path, payload)
    with pytest.raises(InputError) as error:
        load_train_config(path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_reward_files_of_every_kind(tmp_path):
    """What provenance hashes and the workflow verifies: each model of a mix, no other keys."""
    reward = {
        "kind": "mix",
        "mix": {"hpsv2": 1.0, "hpsv3": 0.5},
        "checkpoint": "hps.pt",
        "model_path": "pick",
        "hpsv3_checkpoint": "HPSv3.safetensors",
        "hpsv3_config": "HPSv3.yaml",
    }
    config = load_train_config(write(tmp_path, {**MINIMAL, "reward": reward})).reward
    assert config.weight_paths() == {
        "checkpoint": "hps.pt",
        "hpsv3_checkpoint": "HPSv3.safetensors",
        "hpsv3_config": "HPSv3.yaml",
    }
    arguments = config.load_arguments()
    assert arguments["weights"] == {"hpsv2": 1.0, "hpsv3": 0.5}
    assert arguments["arguments"]["hpsv3"] == {
        "checkpoint": Path("HPSv3.safetensors"),
        "config": Path("HPSv3.yaml"),
        "scale": 0.025,
    }
    alone = config.model_copy(update={"kind": "pickscore", "mix": None})
    assert alone.weight_paths() == {"model_path": "pick"}


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_train_config(tmp_path / "absent.yaml")
    with pytest.raises(InputError, match="not valid YAML"):
        load_train_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(InputError, match="expected a mapping"):
        load_train_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_take_precedence(tmp_path):
    config = load_train_config(write(tmp_path, MINIMAL), {"max_steps": 3, "seed": None})
    assert config.max_steps == 3 and config.seed == 42


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, {**MINIMAL, "batch_size": -4})
    result = subprocess.run(
        [sys.executable, "-m", "srpo", "train", "--config", str(path)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: batch_size: Input should be greater than or equal to 1"
    ]


def test_the_paper_run_watches_held_out_metrics_and_stops_on_collapse():
    """config/train-paper.yaml: metrics other than the training reward, at the steps where
    SRPO's effect peaks and at the last, sized for 32 GPUs (one chunk of 8 per rank)."""
    config = load_train_config(REPO / "config" / "train-paper.yaml")
    evaluation = config.evaluation
    assert config.reward.kind not in evaluation.metrics
    assert set(evaluation.metrics) == {"aesthetic", "pickscore"}
    due = [s for s in range(config.max_steps + 1) if s % evaluation.every == 0]
    assert sorted({*due, config.max_steps}) == [0, 10, 19]
    assert evaluation.max_prompts == 32 * evaluation.batch_size
    assert set(evaluation.collapse.margins) == set(evaluation.metrics)
    assert evaluation.collapse.stop
