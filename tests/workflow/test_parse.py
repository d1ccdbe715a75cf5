"""Planning stays light: parsing the workflow imports neither torch nor diffusers (nor any srpo
module that does), so `snakemake -n` answers in about a second (benchmarks/README.md)."""

import subprocess
import sys
from pathlib import Path

import pytest
from support import copy_workflow, venv_env

pytestmark = pytest.mark.workflow

HEAVY = ("torch", "diffusers")


@pytest.fixture(scope="module")
def heavy_refused(tmp_path_factory) -> Path:
    """A folder whose torch and diffusers refuse to be imported, first on the path."""
    folder = tmp_path_factory.mktemp("heavy")
    for name in HEAVY:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} imported while the workflow was parsed')\n"
        )
    return folder


@pytest.mark.parametrize("profile", [None, "slurm"], ids=["tiny", "paper"])
def test_the_dag_parses_without_heavy_imports(tmp_path, heavy_refused, profile):
    folder = copy_workflow(tmp_path / "workflow", "slurm")
    options = ["--profile", profile] if profile else ["--cores", "1"]
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-n", *options],
        cwd=folder,
        env=venv_env(PYTHONPATH=str(heavy_refused)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_srpo" in result.stdout
