"""The Snakemake workflow on the embedded tiny default: end to end, re-runs, config errors.

The workflow files (Snakefile, workflow/, config/) are copied into a temporary folder so the
run writes its results/ there, exactly as `snakemake --cores 2` does at the repository root.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO, copy_workflow, run_env

pytestmark = pytest.mark.workflow
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(folder: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = run_env(PATH=f"{bin_dir}:{run_env()['PATH']}")
    return subprocess.run(
        [SNAKEMAKE, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )


def jobs_planned(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Snakemake's own "Job stats" table of a dry run, as {rule: count}."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="module")
def finished(workdir) -> Path:
    result = snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir


def test_tiny_workflow_end_to_end(finished):
    report = finished / "results" / "tiny" / "report"
    text = (report / "report.md").read_text()
    for heading in ("## All prompts", "## HPSv2.1 by HPD style", "## Aesthetic by HPD style",
                    "## PickScore by HPD style", "## Image grid", "## Training curves",
                    "## Provenance"):  # fmt: skip
        assert heading in text, heading
    for figure in ("score_distributions", "image_grid", "training_curves"):
        assert f"figures/{figure}.png" in text
        assert (report / "figures" / f"{figure}.png").stat().st_size > 1000
    assert "| SRPO |" in text and "| FLUX.1-dev |" in text
    for style in ("anime", "concept-art", "paintings", "photo"):
        assert style in text


def test_second_run_does_nothing(finished):
    assert jobs_planned(snakemake(finished, "-n", "--cores", "2")) == {}


def test_metric_setting_reruns_only_that_metric_and_report(finished, tmp_path):
    config = yaml.safe_load((finished / "config" / "config.yaml").read_text())
    config["metrics"]["pickscore"]["batch_size"] = 3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    planned = jobs_planned(snakemake(finished, "-n", "--cores", "2", "--configfile", str(changed)))
    assert planned == {"score_pickscore": 1, "report": 1, "all": 1}


def test_sampling_setting_reruns_sampling_scoring_and_report(finished, tmp_path):
    config = yaml.safe_load((finished / "config" / "config.yaml").read_text())
    config["sample"]["steps"] = 3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    planned = jobs_planned(snakemake(finished, "-n", "--cores", "2", "--configfile", str(changed)))
    assert set(planned) == {"sample_eval", "gather_samples", "report", "all"} | {
        f"score_{metric}" for metric in config["metrics"]
    }
    assert planned["sample_eval"] == 2 * config["sample"]["shards"]


def test_one_target_recomputes_only_what_it_needs(finished):
    target = "results/tiny/scores/hpsv2.parquet"
    (finished / target).unlink()
    planned = jobs_planned(snakemake(finished, "-n", "--cores", "2", target))
    assert planned == {"score_hpsv2": 1}


def test_snakemake_report_html(finished):
    result = snakemake(finished, "--report", "report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (finished / "report.html").read_text(errors="replace")
    assert "image_grid.png" in html and "summary.csv" in html


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("run"), "config: <top level>: 'run' is a required property"),
        (lambda c: c["sample"].update(steps="many"), "config: sample.steps: 'many' is not of"),
        (lambda c: c["metrics"].update(clipscore={"weights": {}}), "config: metrics: 'clipscore'"),
        (lambda c: c["prompts"].update(source="web"), "config: prompts.source: 'web' is not one"),
    ],
)
def test_broken_config_fails_at_dag_time(tmp_path, edit, message):
    """The default config/config.yaml itself broken: validation names the key at DAG time."""
    shutil.copy(REPO / "Snakefile", tmp_path / "Snakefile")
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    shutil.copytree(REPO / "config", tmp_path / "config")
    config = yaml.safe_load((tmp_path / "config" / "config.yaml").read_text())
    edit(config)
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--cores", "1")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_paper_dag_on_slurm_profile_without_weights(workdir):
    planned = jobs_planned(snakemake(workdir, "-n", "--profile", "profiles/slurm"))
    assert planned["train_srpo"] == 1 and planned["sample_eval"] == 32
    assert {f"score_{m}" for m in ("hpsv2", "hpsv3", "aesthetic", "pickscore", "imagereward")} <= (
        set(planned)
    )
