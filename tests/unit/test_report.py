"""The report's numbers from a hand-made score table with known means."""

import json

import pandas as pd
import pytest
from PIL import Image

from srpo.io import InputError
from srpo.report import read_scores, summarise, write_report
from srpo.score import SCORE_COLUMNS


def score_file(tmp_path, model, metric, values, styles):
    frame = pd.DataFrame(
        {
            "prompt_id": range(len(values)),
            "style": styles,
            "prompt": [f"prompt {i}" for i in range(len(values))],
            "image": [f"{model}/{i:05d}.png" for i in range(len(values))],
            "score": values,
            "model": model,
            "metric": metric,
            "metric_version": metric.upper(),
            "checkpoint_sha256": json.dumps({"w.pt": "ab" * 32}),
        },
        columns=list(SCORE_COLUMNS),
    )
    path = tmp_path / f"{model}-{metric}.parquet"
    frame.to_parquet(path)
    return path


@pytest.fixture
def files(tmp_path):
    styles = ["photo", "photo", "anime", "anime"]
    return [
        score_file(tmp_path, "base", "hpsv2", [0.20, 0.22, 0.24, 0.26], styles),
        score_file(tmp_path, "srpo", "hpsv2", [0.30, 0.32, 0.34, 0.36], styles),
        score_file(tmp_path, "base", "aesthetic", [5.0, 6.0, 7.0, 6.0], styles),
        score_file(tmp_path, "srpo", "aesthetic", [6.0, 7.0, 8.0, 7.0], styles),
    ]


def test_summary_numbers_by_hand(files):
    summary = summarise(read_scores(files), "base").set_index(["metric", "model", "style"])
    row = summary.loc[("hpsv2", "base", "all")]
    # mean .23; std of (.2,.22,.24,.26) with ddof 1 = sqrt(.002/3) = 0.0258199
    assert row["n"] == 4 and row["mean"] == pytest.approx(0.23)
    assert row["std"] == pytest.approx(0.0258199, abs=1e-7)
    # t(0.975, 3) = 3.182446; half width = 3.182446 · 0.0258199 / 2 = 0.0410853
    assert row["ci95_high"] - row["mean"] == pytest.approx(0.0410853, abs=1e-6)
    srpo = summary.loc[("hpsv2", "srpo", "all")]
    assert srpo["delta"] == pytest.approx(0.10)
    assert srpo["delta_pct"] == pytest.approx(100 * 0.10 / 0.23)
    anime = summary.loc[("aesthetic", "srpo", "anime")]
    assert anime["mean"] == pytest.approx(7.5) and anime["delta_pct"] == pytest.approx(100 / 6.5)


def test_markdown_and_latex_numbers(files, tmp_path):
    report = write_report(files, "base", tmp_path / "report")
    text = report.read_text()
    assert "| base | 0.2300 ± 0.0258 | 6.0000 ± 0.8165 |" in text
    assert "| srpo | 0.3300 ± 0.0258 (+43.5%) | 7.0000 ± 0.8165 (+16.7%) |" in text
    assert "| model | HPSv2.1 | Aesthetic |" in text
    # per style: HPSv2.1 anime base (.24, .26) → .25 ± .0141; srpo photo (.30, .32) → .31
    assert "| base | 0.2500 ± 0.0141 | 0.2100 ± 0.0141 | 0.2300 ± 0.0258 |" in text
    assert "| srpo | 0.3500 ± 0.0141 (+40.0%) | 0.3100 ± 0.0141 (+47.6%) |" in text
    latex = (tmp_path / "report" / "tables" / "tables.tex").read_text()
    assert r"srpo & 0.3300 $\pm$ 0.0258 (+43.5\%) & 7.0000 $\pm$ 0.8165 (+16.7\%) \\" in latex
    assert r"\toprule" in latex and r"\bottomrule" in latex
    csv = pd.read_csv(tmp_path / "report" / "tables" / "summary.csv")
    assert len(csv) == 2 * 2 * 3  # metrics × models × (2 styles + all)
    assert "![scores](figures/score_distributions.png)" in text
    assert (tmp_path / "report" / "figures" / "score_distributions.png").is_file()
    provenance = json.loads((tmp_path / "report" / "provenance.json").read_text())
    assert provenance["weights"]["metric:hpsv2"] == {"w.pt": "ab" * 32}


def test_image_grid_and_curves(files, tmp_path):
    samples = {}
    for model, colour in (("base", (200, 0, 0)), ("srpo", (0, 0, 200))):
        folder = tmp_path / "samples" / model
        (folder / "images").mkdir(parents=True)
        entries = []
        for prompt_id in range(4):
            name = f"images/{prompt_id:05d}.png"
            Image.new("RGB", (32, 32), colour).save(folder / name)
            entries.append({"prompt_id": prompt_id, "style": "photo", "prompt": "p", "file": name})
        (folder / "manifest.json").write_text(json.dumps({"images": entries}))
        samples[model] = folder
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 4):
        writer.add_scalar("reward/denoise", 0.1 * step, step)
    writer.close()
    report = write_report(
        files, "base", tmp_path / "out", samples=samples, training_runs={"srpo": tmp_path / "tb"}
    )
    text = report.read_text()
    assert "![grid](figures/image_grid.png)" in text
    assert "![curves](figures/training_curves.png)" in text
    grid = Image.open(tmp_path / "out" / "figures" / "image_grid.png")
    assert 1.5 < grid.height / grid.width < 2.5  # 4 prompts (rows) × 2 models (columns)


def test_bad_inputs(files, tmp_path):
    with pytest.raises(InputError, match="score file not found"):
        read_scores([tmp_path / "none.parquet"])
    pd.DataFrame({"score": [1.0]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad.parquet: missing column\(s\)"):
        read_scores([tmp_path / "bad.parquet"])
    with pytest.raises(InputError, match="baseline model 'nope' has no scores"):
        summarise(read_scores(files), "nope")


def test_report_names_its_config_and_what_tiny_scores_mean(files, tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("run: tiny\ntiny_models: true\n")
    report = write_report(
        files, "base", tmp_path / "tiny-out", configs=[tiny], config_overrides=["sample.steps=3"]
    )
    opening = report.read_text().split("## All prompts")[0]
    assert f"Produced by the workflow config `{tiny}`, `--config sample.steps=3` (run `tiny`)." in (
        opening
    )
    assert "Tiny random-initialised models" in opening
    html = (tmp_path / "tiny-out" / "tables" / "tables.html").read_text()
    assert "<code>tiny_models: true</code>" in html
    # The paper-style tables as HTML: the overall one and one per metric by style.
    assert html.count("<table") == 3 and "<th>HPSv2.1</th>" in html and "<td>srpo</td>" in html
    provenance = json.loads((tmp_path / "tiny-out" / "provenance.json").read_text())
    assert provenance["config"]["configs"] == {str(tiny): "run: tiny\ntiny_models: true\n"}

    paper = tmp_path / "paper.yaml"
    paper.write_text("run: paper\ntiny_models: false\n")
    text = write_report(files, "base", tmp_path / "paper-out", configs=[paper]).read_text()
    assert f"Produced by the workflow config `{paper}` (run `paper`)." in text
    assert "Tiny random-initialised" not in text


def test_unreadable_workflow_config_is_one_line(files, tmp_path):
    with pytest.raises(InputError, match=r"absent.yaml: unreadable workflow config"):
        write_report(files, "base", tmp_path / "out", configs=[tmp_path / "absent.yaml"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InputError, match=r"list.yaml: expected a YAML mapping of config keys"):
        write_report(files, "base", tmp_path / "out", configs=[tmp_path / "list.yaml"])
    assert not (tmp_path / "out").exists()


def test_held_out_curves_join_the_training_curves(tmp_path):
    """eval/… scalars get panels of their own (a second row), eval/collapse does not."""
    from torch.utils.tensorboard import SummaryWriter

    from srpo.report import TRAINING_PANELS, training_curves

    sizes = {}
    for name, tags in (
        ("plain", ["reward/denoise"]),
        ("watched", ["reward/denoise", "eval/aesthetic", "eval/collapse"]),
    ):
        writer = SummaryWriter(str(tmp_path / name))
        for step in range(3):
            for tag in tags:
                writer.add_scalar(tag, 0.1 * step, step)
        writer.close()
        path = training_curves({"run": tmp_path / name}, tmp_path / f"{name}.png")
        sizes[name] = Image.open(path).size
    assert len(TRAINING_PANELS) == 4
    assert sizes["watched"][0] == sizes["plain"][0], "the same four columns"
    assert 1.8 < sizes["watched"][1] / sizes["plain"][1] < 2.2, "one more row: eval/aesthetic"
