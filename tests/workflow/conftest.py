"""The tiny default workflow, run once per session in a copy of the workflow files."""

from pathlib import Path

import pytest
from support import copy_workflow, snakemake


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="session")
def finished(workdir) -> Path:
    """`snakemake --cores 2` on the embedded tiny default, finished."""
    result = snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir
