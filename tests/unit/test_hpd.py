"""HPD prompt preparation: cleaning counted per kind, no train/eval overlap, seeded limits, T5
length counts with the real tokenizer, clear errors."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from srpo.cli import app
from srpo.hpd import HPD_STYLES, clean, prepare_prompts
from srpo.io import InputError

NOTHING_DROPPED = {"non_utf8": 0, "empty": 0, "cjk": 0, "eval_overlap": 0, "duplicate": 0}

MESSY_TRAIN = [  # the bytes between the quotes of each "prompt"
    b"a red fox in the snow",
    b"A  Red fox in the SNOW ",  # duplicate: case and spacing differ
    b"",  # empty
    b"   \t ",  # whitespace only (a raw tab, as hand-edited JSON has)
    b"caf\xe9 on a street",  # Latin-1, not UTF-8
    b"a\x00 cat\ton a\r\ntable",  # raw NUL, tab, CR, LF: "a cat on a table"
    b"a black\\u200b dog",  # zero-width space (JSON escape): "a black dog"
    "猫の絵 a cat painting".encode(),  # Han + Hiragana
    "한국 풍경".encode(),  # Hangul
    b"a photo of a dog",  # a benchmark prompt
    b"cat " * 40,  # long: kept whole, whatever its length
    b"bad \xff\xfe bytes",  # not UTF-8
]
MESSY_STYLES = {
    "anime": ["あにめ girl".encode()],
    "concept-art": [b"a castle on a hill"],
    "paintings": [b"bad \xc3 byte"],  # a cut UTF-8 sequence
    "photo": [b"A photo of a dog", b"a  photo of a dog", b"", b"night\x07 city"],
}
KEPT_TRAIN = [
    "a red fox in the snow",
    "a cat on a table",
    "a black dog",
    "猫の絵 a cat painting",
    "한국 풍경",
    "cat " * 39 + "cat",
]


def hpd_folder(tmp_path, train, styles):
    folder = tmp_path / "hpd"
    (folder / "benchmark").mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps([{"prompt": p} for p in train]))
    for style in HPD_STYLES:
        (folder / "benchmark" / f"{style}.json").write_text(json.dumps(styles.get(style, [])))
    return folder


def messy_folder(tmp_path):
    """The HPDv2 layout written byte by byte: JSON with raw invalid UTF-8 and control bytes."""
    folder = tmp_path / "messy"
    (folder / "benchmark").mkdir(parents=True)
    items = [b'{"prompt": "' + prompt + b'"}' for prompt in MESSY_TRAIN]
    (folder / "train.json").write_bytes(b"[\n" + b",\n".join(items) + b"\n]\n")
    for style in HPD_STYLES:
        prompts = b", ".join(b'"' + prompt + b'"' for prompt in MESSY_STYLES[style])
        (folder / "benchmark" / f"{style}.json").write_bytes(b"[" + prompts + b"]")
    return folder


def eval_rows(out):
    return pd.read_csv(out / "eval.csv", keep_default_na=False).values.tolist()


def test_clean_dedups_and_filters():
    cleaned = clean(["a  cat ", "A cat", "", "dog\nrunning", "x" * 1001])
    assert cleaned.kept == [("a cat", False), ("dog running", True), ("x" * 1001, False)]
    assert cleaned.dropped == {"duplicate": 1, "empty": 1}
    # every character str.splitlines() breaks at becomes a space: one prompt stays one line
    assert clean(["a\u2028b\x1cc\x85d\x0be"]).kept == [("a b c d e", True)]


def test_messy_hpd_folder_is_cleaned_and_counted(tmp_path):
    out = tmp_path / "out"
    manifest = prepare_prompts(out, "local", str(messy_folder(tmp_path)))
    assert (out / "train.txt").read_text(encoding="utf-8").splitlines() == KEPT_TRAIN
    assert eval_rows(out) == [
        [0, "anime", "あにめ girl"],
        [1, "concept-art", "a castle on a hill"],
        [2, "photo", "A photo of a dog"],
        [3, "photo", "night city"],
    ]
    assert manifest["cleaning"]["train"] == {
        "read": 12,
        "dropped": {
            **NOTHING_DROPPED,
            "non_utf8": 2,
            "empty": 2,
            "eval_overlap": 1,
            "duplicate": 1,
        },
        "subsampled_out": 0,
        "written": 6,
        "control_chars": 2,  # "a cat on a table", "a black dog"
        "cjk": 2,
        "over_t5_limit": None,
    }
    assert manifest["cleaning"]["eval"] == {
        "read": 7,
        "dropped": {**NOTHING_DROPPED, "non_utf8": 1, "empty": 1, "duplicate": 1},
        "subsampled_out": 0,
        "written": 4,
        "control_chars": 1,
        "cjk": 1,
        "over_t5_limit": None,
    }
    assert manifest["cjk"] == "keep"


def test_cjk_drop(tmp_path):
    out = tmp_path / "out"
    manifest = prepare_prompts(out, "local", str(messy_folder(tmp_path)), cjk="drop")
    train = (out / "train.txt").read_text(encoding="utf-8").splitlines()
    assert train == [KEPT_TRAIN[0], KEPT_TRAIN[1], KEPT_TRAIN[2], KEPT_TRAIN[5]]
    assert [row[1] for row in eval_rows(out)] == ["concept-art", "photo", "photo"]
    cleaning = manifest["cleaning"]
    assert (cleaning["train"]["dropped"]["cjk"], cleaning["train"]["cjk"]) == (2, 0)
    assert (cleaning["eval"]["dropped"]["cjk"], cleaning["eval"]["written"]) == (1, 3)


def test_t5_counts_with_the_flux_tokenizer(tiny_flux, tmp_path):
    """Every word is one piece of the tiny T5 vocabulary, plus `</s>`: n words = n + 1 tokens."""
    train = ["cat cat cat", "dog " * 7, "owl " * 8, "cat " * 40]  # 4, 8, 9, 41 tokens
    styles = {"photo": ["a red fox in the snow", "fox " * 10]}  # 7, 11 tokens
    folder = hpd_folder(tmp_path, train, styles)
    counts = {}
    for length in (8, 41):
        manifest = prepare_prompts(
            tmp_path / f"o{length}",
            "local",
            str(folder),
            base_model=str(tiny_flux),
            max_sequence_length=length,
        )
        cleaning = manifest["cleaning"]
        counts[length] = (cleaning["train"]["over_t5_limit"], cleaning["eval"]["over_t5_limit"])
    assert counts == {8: (2, 1), 41: (0, 0)}
    assert manifest["t5"] == {"tokenizer": str(tiny_flux), "max_sequence_length": 41}


def test_train_file_bytes(tmp_path):
    """A BOM, CRLF endings, a blank line, a duplicate, Latin-1 bytes and a NUL."""
    train_file = tmp_path / "mine.txt"
    train_file.write_bytes(
        b"\xef\xbb\xbfa red fox\r\n\r\nA RED FOX\r\ncaf\xe9 au lait\r\nthe moon\x00\r\n"
    )
    folder = hpd_folder(tmp_path, [], {"photo": ["a photo of a dog"]})
    manifest = prepare_prompts(tmp_path / "out", "local", str(folder), train_file=train_file)
    assert (tmp_path / "out" / "train.txt").read_text().splitlines() == ["a red fox", "the moon"]
    train = manifest["cleaning"]["train"]
    assert train["dropped"] == {**NOTHING_DROPPED, "non_utf8": 1, "empty": 1, "duplicate": 1}
    assert (train["read"], train["control_chars"]) == (5, 1)


def test_bundled_set(tmp_path):
    manifest = prepare_prompts(tmp_path / "out")
    train = (tmp_path / "out" / "train.txt").read_text().splitlines()
    evaluation = pd.read_csv(tmp_path / "out" / "eval.csv")
    assert manifest["counts"]["train"] == len(train) == 15  # 17 raw: one duplicate, one empty
    assert manifest["cleaning"]["train"]["dropped"] == {
        **NOTHING_DROPPED,
        "empty": 1,
        "duplicate": 1,
    }
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
    assert first["cleaning"]["train"]["subsampled_out"] == 2  # 4 usable, limit 2
    assert first["cleaning"]["eval"]["subsampled_out"] == 1  # anime: 3, limit 2
    assert first["sha256"] == again["sha256"]


def test_cli_summary(tmp_path):
    args = ["prepare-prompts", "--out-dir", str(tmp_path / "out"), "--source", "local"]
    result = CliRunner().invoke(
        app, [*args, "--path", str(messy_folder(tmp_path)), "--cjk", "drop"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "train: kept 4 of 12 (dropped 2 non-UTF-8, 2 empty, 2 CJK, 1 in the benchmark,"
        " 1 duplicate; 2 with control characters removed; T5 length not checked (no --base-model))",
        "eval: kept 3 of 7 (dropped 1 non-UTF-8, 1 empty, 1 CJK, 1 duplicate;"
        " 1 with control characters removed; T5 length not checked (no --base-model))",
        f"wrote 4 training and 3 evaluation prompts to {tmp_path / 'out'}",
    ]


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--cjk", "maybe"], "error: prompts.cjk: expected keep or drop, got 'maybe'"),
        (
            ["--base-model", "{tmp}"],
            "error: {tmp}: expected a FLUX base model folder with tokenizer_2/",
        ),
    ],
)
def test_cli_bad_options_one_line(tmp_path, option, expected):
    option = [value.format(tmp=tmp_path) for value in option]
    result = CliRunner().invoke(app, ["prepare-prompts", "--out-dir", str(tmp_path), *option])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [expected.format(tmp=tmp_path)]


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
    with pytest.raises(InputError, match=r"mine.txt: training prompt file not found"):
        prepare_prompts(tmp_path / "out", train_file=tmp_path / "mine.txt")
    (tmp_path / "mine.txt").write_bytes(b"\n \t\n\xff\n")
    with pytest.raises(
        InputError, match=r"mine.txt: no usable .*\(dropped 1 non-UTF-8, 2 empty\)$"
    ):
        prepare_prompts(tmp_path / "out", train_file=tmp_path / "mine.txt")
