"""The Snakemake workflow on the embedded tiny default: end to end, re-runs, config errors.

The workflow files (Snakefile, workflow/, config/) are copied into a temporary folder so the
run writes its results/ there, exactly as `snakemake --cores 2` does at the repository root.
"""

import json
import re
import shutil
import subprocess
from importlib import metadata

import pytest
import yaml
from support import REPO, copy_workflow, mix_training, snakemake

pytestmark = pytest.mark.workflow


def jobs_planned(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Snakemake's own "Job stats" table of a dry run, as {rule: count}."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def test_tiny_workflow_end_to_end(finished):
    report = finished / "results" / "tiny" / "report"
    text = (report / "report.md").read_text()
    for heading in ("## All prompts", "## HPSv2.1 by HPD style", "## HPSv3 by HPD style",
                    "## Aesthetic by HPD style", "## PickScore by HPD style", "## Image grid",
                    "## Training curves", "## Provenance"):  # fmt: skip
        assert heading in text, heading
    # The paper's three metrics first, in its order, then PickScore.
    assert "| model | HPSv2.1 | HPSv3 | Aesthetic | PickScore |" in text
    for figure in ("score_distributions", "image_grid", "training_curves"):
        assert f"figures/{figure}.png" in text
        assert (report / "figures" / f"{figure}.png").stat().st_size > 1000
    for style in ("anime", "concept-art", "paintings", "photo"):
        assert style in text


def test_tiny_report_says_what_its_models_are(finished):
    text = (finished / "results" / "tiny" / "report" / "report.md").read_text()
    opening = text.split("## All prompts")[0]
    assert "Produced by the workflow config `config/config.yaml` (run `tiny`)." in opening
    assert "Tiny random-initialised models" in opening and "no meaning" in opening
    assert "| tiny FLUX (random init) |" in text and "| tiny SRPO |" in text
    assert "FLUX.1-dev |" not in text and "| SRPO |" not in text
    html = (finished / "results" / "tiny" / "report" / "tables" / "tables.html").read_text()
    assert "Tiny random-initialised models" in html and "<th>HPSv3</th>" in html


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
        f"score_{metric}" for metric in config["scored_metrics"]
    }
    assert planned["sample_eval"] == 2 * config["sample"]["shards"]


def test_one_target_recomputes_only_what_it_needs(finished):
    target = "results/tiny/scores/hpsv2.parquet"
    (finished / target).unlink()
    planned = jobs_planned(snakemake(finished, "-n", "--cores", "2", target))
    assert planned == {"score_hpsv2": 1}
    # Made again, so that the tests after this one start from a finished workflow.
    assert snakemake(finished, "--cores", "2", target).returncode == 0


def test_training_with_an_hpsv3_mix_runs_in_its_environment(finished, tmp_path):
    """A training reward that needs the hpsv3 environment (a mix with HPSv3) trains there, with
    no step by hand, and the run goes on to the report; nothing before training reruns. The
    previous reward's checkpoints are not resumed."""
    folder = tmp_path / "mix"
    shutil.copytree(finished, folder, symlinks=True)
    mix = mix_training(folder, max_steps=4)
    planned = jobs_planned(snakemake(folder, "-n", "--cores", "2", "--configfile", mix))
    assert {"train_srpo", "report"} <= set(planned)
    assert not set(planned) & {"prepare_prompts", "encode_prompts", "build_tiny_hpsv3"}
    tiny = folder / "results" / "tiny"
    # The default run's checkpoints are another run's: training refuses to continue them.
    result = snakemake(folder, "--cores", "2", "--configfile", mix)
    assert result.returncode != 0
    assert (
        "checkpoint was written with reward.kind=hpsv2, the config says mix; resume needs the"
        " same value (to train afresh, remove results/tiny/train/checkpoints)"
    ) in (tiny / "logs" / "train_srpo.log").read_text()
    shutil.rmtree(tiny / "train" / "checkpoints")
    result = snakemake(folder, "--cores", "2", "--configfile", mix)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trained to step 4" in (tiny / "logs" / "train_srpo.log").read_text()
    checkpoint = sorted((tiny / "train" / "checkpoints").glob("step-*"))[-1]
    packages = json.loads((checkpoint / "provenance.json").read_text())["packages"]
    hpsv3_lock = (REPO / "envs" / "hpsv3.lock.txt").read_text()
    assert f"\ntransformers=={packages['transformers']} " in hpsv3_lock  # its environment's
    assert packages["transformers"] != metadata.version("transformers")  # not main's
    config = yaml.safe_load((checkpoint / "provenance.json").read_text())["config"]
    assert config["reward"]["mix"] == {"hpsv2": 1.0, "hpsv3": 0.5}
    report = (tiny / "report" / "report.md").read_text()
    assert "| tiny SRPO |" in report and "config/mix.yaml" in report


@pytest.mark.parametrize(
    ("mix", "procs", "nodes", "launch"),
    [
        (False, 2, 1, "torchrun --shutdown-timeout 30 --standalone --nproc-per-node 2 -m srpo"),
        (True, 2, 1, "torchrun-hpsv3 --shutdown-timeout 30 --standalone --nproc-per-node 2 -m"),
        (True, 1, 1, "srpo-hpsv3 train --config config/train-mix.yaml"),
        (True, 2, 2, "srun --ntasks-per-node 1 torchrun-hpsv3 --shutdown-timeout 30 --nnodes 2"),
    ],
)
def test_train_srpo_command_of_its_reward_environment(tmp_path, mix, procs, nodes, launch):
    folder = copy_workflow(tmp_path)
    chosen = mix_training(folder) if mix else "config/config.yaml"
    config = yaml.safe_load((folder / chosen).read_text())
    config["train"].update(nproc_per_node=procs, nodes=nodes)
    (folder / "config" / "launch.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    target = "results/tiny/train/model/diffusion_pytorch_model.safetensors"
    result = snakemake(folder, "-n", "-p", target, "--configfile", "config/launch.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    command = next(line for line in result.stdout.splitlines() if " train --config " in line)
    assert launch in command, command
    # HPSv3's tiny model is built (in its environment) before training reads it.
    assert ("models/manifest-hpsv3.json" in result.stdout.split("rule train_srpo:")[1]) == mix


def test_rewards_of_two_environments_fail_at_dag_time(tmp_path):
    folder = copy_workflow(tmp_path)
    containers = folder / "config" / "containers.yaml"
    containers.write_text(containers.read_text().replace(
        "score_pickscore: main", "score_pickscore: imagereward"))  # fmt: skip
    mix = mix_training(folder)
    training = folder / "config" / "train-mix.yaml"
    settings = yaml.safe_load(training.read_text())
    settings["reward"].update(mix={"pickscore": 1.0, "hpsv3": 0.5}, model_path="m")
    training.write_text(yaml.safe_dump(settings))
    result = snakemake(folder, "-n", "--cores", "1", "--configfile", mix)
    assert result.returncode != 0
    assert (
        "config/train-mix.yaml: reward: ['hpsv3', 'pickscore'] need the environments"
        " ['hpsv3', 'imagereward'], which cannot run in one training process"
    ) in result.stdout + result.stderr


def test_snakemake_report_html(finished):
    result = snakemake(finished, "--report", "report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (finished / "report.html").read_text(errors="replace")
    assert "image_grid.png" in html and "summary.csv" in html and "tables.html" in html


def test_imagereward_is_one_config_line_away(finished):
    """Opting in plans its tiny build (in its own environment), its score and the report."""
    scored = "scored_metrics=[hpsv2,hpsv3,aesthetic,pickscore,imagereward]"
    planned = jobs_planned(snakemake(finished, "-n", "--cores", "2", "--config", scored))
    assert planned == {"build_tiny_imagereward": 1, "score_imagereward": 1, "report": 1, "all": 1}


def test_lint_before_any_image_is_published(workdir):
    """A fresh clone (every image null): one notice naming the command that publishes them."""
    result = snakemake(workdir, "--lint")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    notices = [line for line in output.splitlines() if "bash containers/build.sh --push" in line]
    assert len(notices) == 1 and notices[0].startswith("containers: no image published yet")
    assert "Specify a conda environment or container" not in output
    assert "Lints for rule" not in output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("run"), "config: <top level>: 'run' is a required property"),
        (lambda c: c["sample"].update(steps="many"), "config: sample.steps: 'many' is not of"),
        (lambda c: c["metrics"].update(clipscore={"weights": {}}), "config: metrics: 'clipscore'"),
        (lambda c: c["prompts"].update(source="web"), "config: prompts.source: 'web' is not one"),
        (lambda c: c["metrics"].pop("hpsv3"), "config: scored_metrics: 'hpsv3' has no settings"),
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
    assert planned["encode_held_out"] == 1  # the run's held-out evaluation (train-paper.yaml)
    assert {f"score_{m}" for m in ("hpsv2", "hpsv3", "aesthetic", "pickscore", "imagereward")} <= (
        set(planned)
    )
