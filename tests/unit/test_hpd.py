"""HPD prompt preparation: cleaning, no train/eval overlap, seeded limits, clear errors."""

import json

import pandas as pd
import pytest

from srpo.hpd import HPD_STYLES, clean, prepare_prompts
from srpo.io import InputError


def hpd_folder(tmp_path, train, styles):
    folder = tmp_path / "hpd"
    (folder / "benchmark").mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps([{"prompt": p} for p in train]))
    for style in HPD_STYLES:
        (folder / "benchmark" / f"{style}.json").write_text(json.dumps(styles.get(style, [])))
    return folder


def test_clean_dedups_and_filters():
    assert clean(["a  cat ", "A cat", "", "dog\nrunning", "x" * 1001]) == ["a cat", "dog running"]


def test_bundled_set(tmp_path):
    manifest = prepare_prompts(tmp_path / "out")
    train = (tmp_path / "out" / "train.txt").read_text().splitlines()
    evaluation = pd.read_csv(tmp_path / "out" / "eval.csv")
    assert manifest["counts"]["train"] == len(train) == 15  # 17 raw: one duplicate, one empty
    assert list(evaluation.columns) == ["prompt_id", "style", "prompt"]
    assert set(evaluation["style"]) == set(HPD_STYLES)
    assert evaluation["prompt_id"].tolist() == list(range(16))


def test_eval_prompts_never_train_and_limits_are_seeded(tmp_path):
    folder = hpd_folder(
        tmp_path,
        ["a photo of a dog", "a b", "c d", "e f", "g h"],
        {"photo": ["A photo of a dog", "a photo of a cat"], "anime": ["x", "y", "z"]},
    )
    first = prepare_prompts(tmp_path / "o1", "local", str(folder), train_limit=2, eval_per_style=2)
    again = prepare_prompts(tmp_path / "o2", "local", str(folder), train_limit=2, eval_per_style=2)
    train = (tmp_path / "o1" / "train.txt").read_text().splitlines()
    assert "a photo of a dog" not in train and len(train) == 2
    assert first["counts"]["anime"] == 2 and first["counts"]["photo"] == 2
    assert first["sha256"] == again["sha256"]


def test_bad_layouts_name_the_file(tmp_path):
    folder = hpd_folder(tmp_path, ["a"], {})
    (folder / "benchmark" / "photo.json").unlink()
    with pytest.raises(InputError, match=r"benchmark/photo.json: not found"):
        prepare_prompts(tmp_path / "out", "local", str(folder))
    (folder / "train.json").write_text('{"prompt": "a"}')
    with pytest.raises(InputError, match=r"train.json: expected a list"):
        prepare_prompts(tmp_path / "out", "local", str(folder))
    with pytest.raises(InputError, match=r"prompts\.path: required"):
        prepare_prompts(tmp_path / "out", "local", None)
