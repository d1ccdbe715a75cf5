"""The README's "Failure modes" table, run row by row: each bad input gives its one line, a
non-zero exit status and no partial output. `python tests/unit/test_failure_modes.py` prints
the table for the README; `test_readme_lists_every_row` keeps the two the same."""

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from support import run_env  # noqa: E402


@dataclass(frozen=True)
class Row:
    stage: str
    bad_input: str
    command: str
    message: str
    status: int = 2


ROWS = [
    Row(**row)
    for row in yaml.safe_load((Path(__file__).with_name("failure_modes.yaml")).read_text())
]


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_models):
    """Every bad input of ROWS, written once; returns the placeholders of the commands."""
    import hashlib
    import shutil

    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    (d / "blank.txt").write_bytes(b"\n  \n\xff\xfe\n")
    (d / "empty_line.txt").write_text("a cat\n\na dog\n")
    (d / "latin1.txt").write_bytes(b"caf\xe9\n")
    (d / "prompts.txt").write_text("a cat\n")
    (d / "eval.csv").write_text("prompt_id,style,prompt\n0,photo,a cat\n")
    (d / "nostyle.csv").write_text("prompt_id,prompt\n0,a cat\n")
    (d / "bad.yaml").write_text("a: [1\n")
    (d / "bad-workflow.yaml").write_text("run: tiny\nsample: {steps: 4}\n")
    flux = shutil.copytree(tiny_models / "flux", d / "flux")
    weights = flux / "text_encoder" / "model.safetensors"
    good = hashlib.sha256(weights.read_bytes()).hexdigest()
    flip_one_byte(weights)
    bad = hashlib.sha256(weights.read_bytes()).hexdigest()
    base = yaml.safe_load((REPO / "config" / "train-tiny.yaml").read_text())
    models = tiny_models.as_posix()
    base = json.loads(json.dumps(base).replace("results/tiny/models", models))
    base["embeddings"] = str(d / "nowhere" / "index.json")
    configs = {
        "good.yaml": {},
        "unknown.yaml": {"learning_rate": 1.0},
        "height.yaml": {"height": 100},
        "precision.yaml": {"precision": "fp16"},
        "steps0.yaml": {"max_steps": 0},
        "type.yaml": {"batch_size": "many"},
        "nockpt.yaml": {"reward": {"kind": "hpsv2"}},
        "noembed.yaml": {},
        "lr.yaml": {"optim": {"learning_rate": -1.0}},
        "watch.yaml": {"evaluation": {"metrics": {"clipscore": {}}}},
        "margin.yaml": {
            "evaluation": {**base["evaluation"], "collapse": {"margins": {"hpsv3": 1}}}
        },
        "mix.yaml": {"reward": {"kind": "mix"}},
        "lora.yaml": {"lora": {"rank": 0}},
    }
    for name, changes in configs.items():
        (d / name).write_text(yaml.safe_dump({**base, **changes}))
    samples = d / "samples" / "images"
    samples.mkdir(parents=True)
    entries = []
    for prompt_id in range(2):
        Image.new("RGB", (32, 32), (90, 40 * prompt_id, 200)).save(samples / f"{prompt_id:05d}.png")
        entry = {"prompt_id": prompt_id, "style": "photo", "prompt": "a cat"}
        entries.append({**entry, "file": f"images/{prompt_id:05d}.png"})
    (samples / "00001.png").write_bytes((samples / "00001.png").read_bytes()[:60])
    (d / "samples" / "manifest.json").write_text(json.dumps({"images": entries}))
    pd.DataFrame({"score": [1.0]}).to_parquet(d / "columns.parquet")
    scores = {
        "model": ["A"], "metric": ["hpsv2"], "metric_version": ["HPSv2.1"], "prompt_id": [0],
        "style": ["photo"], "prompt": ["a cat"], "image": ["images/00000.png"], "score": [0.2],
        "checkpoint_sha256": ["{}"],
    }  # fmt: skip
    pd.DataFrame(scores).to_parquet(d / "scores.parquet")
    return {"d": str(d), "tiny": models, "good": good, "bad": bad}


def readme_line(row: Row) -> str:
    """The row as the README shows it: placeholders as short names."""

    def short(text: str) -> str:
        for key, value in {"{d}/": "", "{tiny}": "tiny", "{out}": "out"}.items():
            text = text.replace(key, value)
        return text.replace("|", "\\|")

    command, message = short(row.command), short(row.message)
    return (
        f"| {row.stage} | {row.bad_input} | `srpo {command}` | `error: {message}` | {row.status} |"
    )


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.stage}: {r.bad_input}" for r in ROWS])
def test_row(row, bad_inputs, tmp_path):
    out = tmp_path / "out"
    values = {**bad_inputs, "out": str(out)}
    command = [sys.executable, "-m", "srpo", *shlex.split(row.command.format(**values))]
    hub = str(Path(bad_inputs["d"]) / "hub")
    env = run_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=hub, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == row.status, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: {row.message.format(**values)}"]
    left = [path for path in out.rglob("*") if path.is_file()] if out.exists() else []
    assert left == [], f"partial output left: {left}"


def test_rows_are_distinct_and_many():
    assert len({(row.stage, row.bad_input) for row in ROWS}) == len(ROWS) >= 30


def test_readme_lists_every_row():
    readme = (REPO / "README.md").read_text()
    missing = [readme_line(row) for row in ROWS if readme_line(row) not in readme]
    assert not missing, "README's Failure modes table lacks:\n" + "\n".join(missing)


if __name__ == "__main__":
    print("| stage | bad input | command | message | exit |\n|---|---|---|---|---|")
    print("\n".join(readme_line(row) for row in ROWS))
