"""Checkpoints written before 6735b6b are still read by the current code.

6735b6b wraps each block in `checkpoint_wrapper` before `fully_shard` and builds the model on
the meta device. The keys of the state dict, DCP and the export must not change. The fixture
`tests/data/checkpoint-0029819/` is a real checkpoint written by 0029819's trainer; its README
says how it was made.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file
from support import REPO, assert_ok, checkpoints, run_env, run_srpo
from torch.distributed.checkpoint import FileSystemReader

pytestmark = pytest.mark.distributed

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "checkpoint-0029819"
OLD_CHECKPOINT = FIXTURE / "step-00000002"
OLD_EXPORT = {
    2: FIXTURE / "export-step-00000002.safetensors",
    3: FIXTURE / "export-step-00000003.safetensors",
}
SAFETENSORS = "diffusion_pytorch_model.safetensors"


def stored(checkpoint: Path) -> dict[str, tuple[int, ...] | None]:
    """Every key a DCP checkpoint holds, with its tensor's shape (None for a non-tensor)."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {key: tuple(getattr(item, "size", ())) or None for key, item in metadata.items()}


def run_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "provenance.json").read_text())["config"]


def plain_keys(base_model: Path) -> set[str]:
    """The state-dict keys of the plain, unwrapped FluxTransformer2DModel."""
    config = FluxTransformer2DModel.load_config(str(base_model), subfolder="transformer")
    with torch.device("meta"):
        return set(FluxTransformer2DModel.from_config(config).state_dict())


def test_new_checkpoint_has_the_old_keys(write_config, tmp_path, tiny_models):
    """A checkpoint the current trainer writes (activation checkpointing on, as in the fixture)
    has the same DCP keys and shapes as 0029819's. Its model keys are the plain model's."""
    config = write_config("new", max_steps=1, checkpoint_every=1)
    result = run_srpo(config, 1)
    written = checkpoints(tmp_path / "new").latest()
    assert written is not None, result.stdout[-3000:] + result.stderr[-3000:]
    for checkpoint in (written, OLD_CHECKPOINT):  # the wrapped blocks are what is tested
        assert run_config(checkpoint)["activation_checkpointing"] is True, checkpoint
    new, old = stored(written), stored(OLD_CHECKPOINT)
    assert sorted(new) == sorted(old), (
        f"only in new: {sorted(new.keys() - old.keys())[:5]}, "
        f"only in old: {sorted(old.keys() - new.keys())[:5]}"
    )
    assert new == old
    model_keys = {key.removeprefix("app.model.") for key in new if key.startswith("app.model.")}
    assert model_keys == plain_keys(tiny_models / "flux")
    assert_ok(result)  # the run's own export reads its checkpoint back under the plain names


def test_export_of_old_checkpoint_is_unchanged(tmp_path, tiny_models):
    """`srpo export` of the fixture gives the plain model's keys and 0029819's tensors, both
    in the single safetensors file and in the diffusers folder."""
    out = tmp_path / "export"
    command = [sys.executable, "-m", "srpo", "export", str(OLD_CHECKPOINT)]
    command += ["--base-model", str(tiny_models / "flux"), "--out-dir", str(out)]
    command += ["--dtype", "float32"]
    result = subprocess.run(
        command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert_ok(result)
    want = load_file(str(OLD_EXPORT[2]))
    assert set(want) == plain_keys(tiny_models / "flux")
    folder = FluxTransformer2DModel.from_pretrained(str(out), subfolder="transformer")
    for got in (load_file(str(out / SAFETENSORS)), folder.state_dict()):
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].dtype == torch.float32, name
            assert torch.equal(got[name], tensor), name


def test_resume_from_old_checkpoint(write_config, tmp_path):
    """The current trainer resumes from the fixture: model, AdamW and RNG state are all read.
    Its step 3 is the step 3 of 0029819's 3-step run with no break."""
    config = write_config("resumed", max_steps=3, checkpoint_every=1)
    run_dir = tmp_path / "resumed"
    shutil.copytree(OLD_CHECKPOINT, run_dir / "checkpoints" / OLD_CHECKPOINT.name)
    result = run_srpo(config, 1)
    assert_ok(result)
    assert f"resumed from {run_dir / 'checkpoints' / OLD_CHECKPOINT.name} at step 2" in (
        result.stdout
    ), result.stdout[-3000:]
    assert checkpoints(run_dir).latest().name == "step-00000003"
    got, want = load_file(str(run_dir / "model" / SAFETENSORS)), load_file(str(OLD_EXPORT[3]))
    assert got.keys() == want.keys()
    before = load_file(str(OLD_EXPORT[2]))
    largest = max(float((want[key] - before[key]).abs().max()) for key in want)
    assert largest > 0, "step 3 changed nothing"
    for name in want:
        # Equal up to 1% of the step's largest update (see support.assert_same_update);
        # a fresh optimizer or different noise moves whole tensors by the update's size.
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=largest / 100, msg=name)
