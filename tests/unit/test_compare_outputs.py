"""scripts/compare_outputs.py, the judge of scripts/same-outputs.sh: what it lets differ."""

import importlib.util
import json

from support import REPO

spec = importlib.util.spec_from_file_location("compare", REPO / "scripts" / "compare_outputs.py")
compare_outputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_outputs)


def results(root, commit: str, learning_rate: float, extra: dict[str, bytes]):
    files = {
        "train/model/diffusion_pytorch_model.safetensors": b"\x00weights",
        "train/checkpoints/step-00000002/provenance.json": json.dumps(
            {"git_commit": commit, "created": commit, "config": {"lr": learning_rate}}
        ).encode(),
        f"train/tensorboard/events.out.tfevents.{commit}.host": commit.encode(),
        "report/report.md": f"- git commit: `{commit * 10}`\n".encode(),
        **extra,
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_runs_of_two_commits_with_the_same_results_compare_equal(tmp_path):
    a = results(tmp_path / "a", "aaaa", 1e-5, {})
    b = results(tmp_path / "b", "bbbb", 1e-5, {})
    counts, problems = compare_outputs.compare(a, b)
    assert problems == []
    assert list(counts.values()) == [1, 1, 1, 1]


def test_a_changed_result_or_a_missing_file_is_named(tmp_path):
    a = results(tmp_path / "a", "aaaa", 1e-5, {"scores/hpsv2.csv": b"1.0\n"})
    b = results(tmp_path / "b", "aaaa", 2e-5, {})
    (b / "train/model/diffusion_pytorch_model.safetensors").write_bytes(b"\x01weights")
    _, problems = compare_outputs.compare(a, b)
    assert problems == [
        f"only in {a}: scores/hpsv2.csv",
        "differs: train/checkpoints/step-00000002/provenance.json",
        "differs: train/model/diffusion_pytorch_model.safetensors",
    ]
    assert compare_outputs.main([str(a), str(b)]) == 1
