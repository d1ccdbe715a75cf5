"""Issue "Evaluation", end to end: `srpo sample` → `srpo score` with all five metrics on tiny
builders (hpsv3 and imagereward through their own environments' `srpo`) → `srpo report`.

Runs from the main environment; needs .venv-hpsv3 and .venv-imagereward (bash
envs/metric-env.sh NAME). Skipped without them, unless SRPO_REQUIRE_METRIC_ENVS=1 (CI), where a
missing environment is a failure.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import REPO, run_env

from srpo.tiny import make_tiny

METRIC_ENVS = {"hpsv3": REPO / ".venv-hpsv3", "imagereward": REPO / ".venv-imagereward"}
MAIN_SRPO = str(Path(sys.executable).with_name("srpo"))


def srpo(executable: str, *args: str) -> None:
    result = subprocess.run(
        [executable, *args], env=run_env(), capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, f"srpo {args[0]}: {result.stdout[-2000:]}{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def envs() -> dict[str, str]:
    missing = [name for name, venv in METRIC_ENVS.items() if not (venv / "bin" / "srpo").exists()]
    if missing:
        message = f"metric environments missing: {missing} (bash envs/metric-env.sh NAME)"
        if os.environ.get("SRPO_REQUIRE_METRIC_ENVS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return {name: str(venv / "bin" / "srpo") for name, venv in METRIC_ENVS.items()}


def test_sample_score_report_with_all_five_metrics(envs, tmp_path):
    models = tmp_path / "models"
    make_tiny(models)
    for name, executable in envs.items():
        srpo(executable, "make-tiny", str(models), "--part", name)
    prompts = tmp_path / "eval.csv"
    prompts.write_text(
        "prompt_id,style,prompt\n0,anime,an anime fox\n1,concept-art,a floating island\n"
        "2,paintings,an oil painting of a harbor\n3,photo,a photo of a dog on a beach\n"
    )
    base = load_file(str(models / "flux" / "transformer" / "diffusion_pytorch_model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))

    settings = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "32"]
    for label, extra in (
        ("base", []),
        ("tuned", ["--transformer", str(tmp_path / "tuned.safetensors")]),
    ):
        out = str(tmp_path / "samples" / label)
        srpo(MAIN_SRPO, "sample", "--base-model", str(models / "flux"), "--prompts", str(prompts),
             "--out-dir", out, *settings, *extra)  # fmt: skip
        srpo(MAIN_SRPO, "gather-samples", out)
    samples = [f"--samples=base={tmp_path / 'samples' / 'base'}",
               f"--samples=tuned={tmp_path / 'samples' / 'tuned'}"]  # fmt: skip
    weights = {
        "hpsv2": {"checkpoint": "hpsv2/HPS_v2.1_compressed.pt",
                  "model_config": "hpsv2/open_clip_config.json"},
        "aesthetic": {"clip_checkpoint": "aesthetic/ViT-L-14.pt",
                      "model_config": "aesthetic/clip_config.json",
                      "mlp_checkpoint": "aesthetic/sac+logos+ava1-l14-linearMSE.pth"},
        "pickscore": {"model_path": "pickscore"},
        "hpsv3": {"checkpoint": "hpsv3/HPSv3.safetensors", "config": "hpsv3/HPSv3_tiny.yaml"},
        "imagereward": {"checkpoint": "imagereward/ImageReward.pt",
                        "med_config": "imagereward/med_config.json",
                        "tokenizer": "imagereward/bert-base-uncased"},
    }  # fmt: skip
    score_files = []
    for metric, files in weights.items():
        out = tmp_path / "scores" / f"{metric}.parquet"
        options = [f"--weight={key}={models / value}" for key, value in files.items()]
        srpo(envs.get(metric, MAIN_SRPO), "score", "--metric", metric, *samples, *options,
             "--out", str(out))  # fmt: skip
        score_files.append(f"--scores={out}")
    srpo(MAIN_SRPO, "report", *score_files, "--baseline", "base", "--out-dir",
         str(tmp_path / "report"), f"--samples=base={tmp_path / 'samples' / 'base'}",
         f"--samples=tuned={tmp_path / 'samples' / 'tuned'}")  # fmt: skip

    text = (tmp_path / "report" / "report.md").read_text()
    header = "| model | HPSv2.1 | HPSv3 | Aesthetic | PickScore | ImageReward |"
    assert header in text, text[:1500]
    for title in ("HPSv2.1", "HPSv3", "Aesthetic", "PickScore", "ImageReward"):
        assert f"## {title} by HPD style" in text
    assert "![grid](figures/image_grid.png)" in text
    assert "| tuned |" in text and "—" not in text.split("## Score distributions")[0]
