"""The wheel folder for a GPU machine without package access: what it lacks, nothing more."""

from pathlib import Path

import pytest

from benchmarks.offline_wheels import LOCK, plan, read_pins

H200 = Path(__file__).parents[1] / "data" / "h200-pip-freeze.txt"


@pytest.fixture(scope="module")
def lock():
    return read_pins(LOCK.read_text())


@pytest.fixture
def h200():
    """The H200's packages once the carried wheels were in: what srpo ran on there."""
    return read_pins(H200.read_text())


def test_a_machine_that_ran_srpo_needs_nothing(h200, lock):
    chosen = plan(h200, lock, "3.12")
    assert chosen.bring == {}
    assert chosen.target_own == {"torch": "2.11.0", "torchvision": "0.26.0"}
    assert {"diffusers", "transformers", "open-clip-torch", "peft"} <= set(chosen.kept)


def test_missing_and_too_old_packages_are_carried_at_the_lock_version(h200, lock):
    """The H200 as first seen: no diffusers, an older transformers (GPU-FINDINGS.md). diffusers
    declares importlib_metadata (which declares lazy-importer), absent there: carried too."""
    del h200["diffusers"]
    h200["transformers"] = read_pins("transformers==5.17.0")["transformers"]
    chosen = plan(h200, lock, "3.12")
    assert chosen.bring == {
        "diffusers": "0.42.1",
        "transformers": "5.24.0",
        "importlib-metadata": "10.2.0",
        "lazy-importer": "0.1.0",
    }
    assert chosen.reasons["diffusers"] == "missing"
    assert chosen.reasons["transformers"].startswith("5.17.0: srpo-workflow needs transformers")


def test_what_a_carried_package_needs_is_carried_too(h200, lock):
    """open_clip needs ftfy, ftfy needs wcwidth: absent there, they come along."""
    for name in ("open-clip-torch", "ftfy", "wcwidth"):
        del h200[name]
    assert set(plan(h200, lock, "3.12").bring) == {"open-clip-torch", "ftfy", "wcwidth"}


@pytest.mark.parametrize("torch_pin", ["torch==2.10.0", None])
def test_a_torch_outside_the_supported_range_is_one_clear_error(h200, lock, torch_pin):
    """torch cannot be carried: the target's own CUDA build must be in range."""
    del h200["torch"]
    if torch_pin:
        h200.update(read_pins(torch_pin))
    with pytest.raises(ValueError, match=r"the target's torch .* install a CUDA build"):
        plan(h200, lock, "3.12")
