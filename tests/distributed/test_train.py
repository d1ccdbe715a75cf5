"""The trainer end to end under real torchrun + gloo: global batch, signals, resume, export."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from support import (
    REPO,
    TRAIN_PROMPTS,
    assert_ok,
    assert_same_update,
    checkpoints,
    kill_tree,
    poisoned_cache,
    run_env,
    run_srpo,
    slow_saves,
    srpo_command,
    start_srpo,
    terminate_once_resumed,
)

from srpo.train.data import batch_prompt_numbers

pytestmark = pytest.mark.distributed


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "diffusion_pytorch_model.safetensors"))


def base_model(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["base_model"])


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"run ended early ({process.returncode}): {out}{err}"[-4000:])
        if time.monotonic() > deadline:
            kill_tree(process.pid)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.1)


def real_images(folder: Path, count: int) -> Path:
    """One distinct image per training prompt number, for the offline mode."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(3)
    for number in range(count):
        pixels = torch.randint(0, 256, (72, 80, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{number}.png")
    return folder


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_two_ranks_match_one_rank(write_config, tmp_path, mode):
    """W processes × B/W samples give the same update as one process × B samples, in offline
    mode too (each sample's VAE posterior draw is its own, not its rank's)."""
    options = {"max_steps": 2, "mode": mode}
    if mode == "offline":
        options["offline_images"] = str(real_images(tmp_path / "images", len(TRAIN_PROMPTS)))
    one, two = write_config("one", **options), write_config("two", **options)
    assert_ok(run_srpo(one, 1))
    assert_ok(run_srpo(two, 2))
    base = load_file(str(base_model(one) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert_same_update(exported(tmp_path / "two"), exported(tmp_path / "one"), base)


def test_fused_branches_match_one_call_per_branch(write_config, tmp_path):
    """The two branches of a sample in one transformer call (`fuse_branches`, the default) give
    the update of one call per branch, up to the batched matmuls' rounding."""
    fused = write_config("fused", max_steps=2)
    apart = write_config("apart", max_steps=2, fuse_branches=False)
    assert_ok(run_srpo(fused, 1))
    assert_ok(run_srpo(apart, 1))
    base = load_file(str(base_model(fused) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert_same_update(exported(tmp_path / "fused"), exported(tmp_path / "apart"), base)


def test_sigterm_then_resume_is_bitwise_equal(write_config, tmp_path):
    """A real SIGTERM to torchrun mid-run: checkpoint, exit, resume → same bits as no stop."""
    steps = 6
    assert_ok(run_srpo(write_config("reference", max_steps=steps), 2))

    config = write_config("stopped", max_steps=steps, checkpoint_every=1)
    process = start_srpo(config, 2)
    wait_for(lambda: checkpoints(tmp_path / "stopped").latest() is not None, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "stopped by signal 15" in err, err[-3000:]
    latest = checkpoints(tmp_path / "stopped").latest()
    assert latest is not None, err[-3000:]
    stopped_at = int(latest.name.split("-")[1])
    assert 1 <= stopped_at < steps, f"stopped at {stopped_at}: too late to test a resume"
    assert not (tmp_path / "stopped" / "model").exists()

    resumed = run_srpo(config, 2)
    assert_ok(resumed)
    assert f"at step {stopped_at}" in resumed.stdout
    want, got = exported(tmp_path / "reference"), exported(tmp_path / "stopped")
    for name in want:
        assert torch.equal(want[name], got[name]), name
    kept = [path.name for path in checkpoints(tmp_path / "stopped").complete()]
    assert kept == [f"step-{step:08d}" for step in range(steps - 2, steps + 1)]  # keep_last=3


def test_kill_during_checkpoint_write_keeps_previous(write_config, tmp_path):
    """SIGKILL while step 2's checkpoint is written: step 1 stays the newest, and is resumed."""
    config = write_config("killed", max_steps=3, checkpoint_every=1)
    root = tmp_path / "killed" / "checkpoints"
    partial = root / ".step-00000002.partial"
    process = start_srpo(config, 2, **slow_saves(5))
    wait_for(lambda: (partial / "train_state.json").is_file(), process)
    kill_tree(process.pid)
    process.communicate(timeout=60)
    assert checkpoints(tmp_path / "killed").latest() == root / "step-00000001"

    result = run_srpo(config, 2)
    assert_ok(result)
    assert "at step 1" in result.stdout
    assert not partial.exists()
    assert checkpoints(tmp_path / "killed").latest() == root / "step-00000003"


def test_corrupt_checkpoint_is_one_clear_line(write_config, tmp_path):
    config = write_config("corrupt", max_steps=1)
    assert_ok(run_srpo(config, 1))
    latest = checkpoints(tmp_path / "corrupt").latest()
    for shard in latest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    result = run_srpo(write_config("corrupt", max_steps=2), None)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {latest}: checkpoint is unreadable" + errors[0].split("unreadable")[1]
    ]
    assert "Traceback" not in result.stderr


def test_missing_resume_checkpoint(write_config, tmp_path):
    missing = tmp_path / "nowhere" / "step-00000004"
    result = run_srpo(write_config("missing"), None, "--resume-from", str(missing))
    assert result.returncode == 2
    assert f"error: {missing}: not a complete checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_quick_start_snippet_loads_export(write_config, tmp_path):
    """The released model's quick start, verbatim, against the tiny base and our export."""
    config = write_config("quick", max_steps=1)
    assert_ok(run_srpo(config, 1))
    ckpt = tmp_path / "quick" / "model" / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "quick.png"
    snippet = f"""
import safetensors.torch
from diffusers import FluxPipeline
BASE, CKPT, prompt = {str(base_model(config))!r}, {str(ckpt)!r}, "a cat on a sofa"
pipe = FluxPipeline.from_pretrained(BASE)
pipe.transformer.load_state_dict(safetensors.torch.load_file(CKPT))
image = pipe(prompt, height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
             max_sequence_length=32).images[0]
image.save({str(out)!r})
"""
    result = subprocess.run(
        [sys.executable, "-c", snippet], env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert_ok(result)
    assert Image.open(out).size == (64, 64)
    folder = tmp_path / "quick" / "model" / "transformer"
    assert (folder / "config.json").is_file()
    assert (tmp_path / "quick" / "model" / "provenance.json").is_file()


def test_sigusr1_stops_a_single_process_run_with_status_75(write_config, tmp_path):
    """Slurm's `--signal=USR1@…` path without torchrun: checkpoint, then exit status 75."""
    config = write_config("usr1", max_steps=50, checkpoint_every=1)
    process = start_srpo(config, None)
    wait_for(lambda: checkpoints(tmp_path / "usr1").latest() is not None, process)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-3000:]
    assert f"stopped by signal {int(signal.SIGUSR1)}" in err
    stopped_at = int(checkpoints(tmp_path / "usr1").latest().name.split("-")[1])
    assert stopped_at < 50


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The transformer and AdamW state of a DCP checkpoint, flattened, read in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    saved = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, saved)
    state = torch.load(saved, weights_only=False)["app"]
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for name, values in state["optim"]["state"].items():
        flat.update({f"optim.{name}.{k}": v for k, v in values.items()})
    return flat


def batch_numbers(config: Path, *steps: int) -> list[int]:
    """The prompt numbers of the global batches of `steps`, in rank order."""
    settings = yaml.safe_load(config.read_text())
    pool = range(len(TRAIN_PROMPTS))
    return [
        number
        for step in steps
        for number in batch_prompt_numbers(settings["seed"], step, settings["batch_size"], pool)
    ]


def test_nonfinite_step_is_skipped_on_both_ranks(write_config, tiny_cache, tmp_path):
    """A NaN on rank 1 alone at step 2 (its prompt's embedding is NaN): both ranks skip that
    update, so the step-2 checkpoint holds exactly the step-1 weights and AdamW state; step 3
    trains on."""
    config = write_config("nan", max_steps=3, checkpoint_every=1, keep_last=3)
    poisoned = batch_numbers(config, 2)[1]  # step 2, rank 1's sample
    assert poisoned not in batch_numbers(config, 1, 3)
    cache = poisoned_cache(tiny_cache, tmp_path / "nan-cache", [poisoned])
    config = write_config(
        "nan", max_steps=3, checkpoint_every=1, keep_last=3, embeddings=str(cache)
    )
    result = run_srpo(config, 2)
    assert_ok(result)
    assert "step 2: non-finite loss or gradient" in result.stderr
    assert "update skipped, 1 of max_bad_steps=3 in a row" in result.stderr
    root = tmp_path / "nan" / "checkpoints"
    one, two, three = (model_tensors(root / f"step-{step:08d}") for step in (1, 2, 3))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert any(not torch.equal(two[key], three[key]) for key in two), "step 3 did not train"


def test_nonfinite_steps_in_a_row_stop_the_run(write_config, tiny_cache, tmp_path):
    """max_bad_steps NaN updates in a row: exit 3 with one clear line; the checkpoint written
    before them stays the newest and complete, and resumes (on a repaired cache)."""
    clean = write_config("diverged", max_steps=5, checkpoint_every=1, max_bad_steps=2)
    cache = poisoned_cache(tiny_cache, tmp_path / "nan-cache", batch_numbers(clean, 2, 3))
    assert not set(batch_numbers(clean, 1)) & set(batch_numbers(clean, 2, 3))
    config = write_config(
        "diverged", max_steps=5, checkpoint_every=1, max_bad_steps=2, embeddings=str(cache)
    )
    result = run_srpo(config, 2)
    root = tmp_path / "diverged" / "checkpoints"
    assert result.returncode != 0
    assert (
        "error: training: steps 2-3 all had a non-finite loss or gradient (max_bad_steps=2); "
        f"stopped without saving, the last good checkpoint is {root / 'step-00000002'}"
    ) in result.stderr, result.stderr[-3000:]
    assert [path.name for path in checkpoints(tmp_path / "diverged").complete()] == [
        "step-00000001",
        "step-00000002",
    ]
    assert not (tmp_path / "diverged" / "model").exists()
    poisoned_cache(tiny_cache, tmp_path / "nan-cache", [])  # the cache repaired in place
    resumed = run_srpo(config, 2)
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout


def with_shutdown_timeout(seconds: int) -> tuple[str, ...]:
    """torchrun's `--shutdown-timeout S`: on SIGTERM it forwards the signal to the workers and
    SIGKILLs them S seconds later, as after a Slurm time limit."""
    return ("--shutdown-timeout", str(seconds))


def test_stop_save_slower_than_the_launcher_window_keeps_a_resumable_checkpoint(
    write_config, tmp_path
):
    """The stop's save takes 20 s, torchrun SIGKILLs 3 s after the SIGTERM: the cut save never
    becomes a checkpoint, the step-1 one stays the newest, and resuming from it gives the same
    bits as a run never stopped."""
    steps = 4
    assert_ok(run_srpo(write_config("reference", max_steps=steps), 2))
    assert_ok(run_srpo(write_config("cut", max_steps=1), 2))
    config = write_config("cut", max_steps=steps)
    process = start_srpo(config, 2, with_shutdown_timeout(3), **slow_saves(20))
    err = terminate_once_resumed(process)
    root = tmp_path / "cut" / "checkpoints"
    assert process.returncode != 0
    assert checkpoints(tmp_path / "cut").latest() == root / "step-00000001", err[-3000:]
    assert list(root.glob(".step-*.partial")), "the stop's save never started"

    resumed = run_srpo(config, 2)
    assert_ok(resumed)
    assert "at step 1" in resumed.stdout
    want, got = exported(tmp_path / "reference"), exported(tmp_path / "cut")
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_stop_skips_a_save_that_cannot_fit(write_config, tmp_path):
    """A run whose saves take 6 s, stopped with stop_grace_s=2: no save is started that the
    launcher would cut; exit 75 at once, naming the checkpoint to resume from."""
    assert_ok(run_srpo(write_config("slow", max_steps=1), 2, **slow_saves(6)))
    config = write_config("slow", max_steps=6, stop_grace_s=2, checkpoint_every=2)
    process = start_srpo(config, 2, with_shutdown_timeout(30), **slow_saves(6))
    saving = tmp_path / "slow" / "checkpoints" / ".step-00000002.partial" / "train_state.json"
    wait_for(saving.is_file, process)  # step 2's periodic save: 6 s, measured
    process.send_signal(signal.SIGTERM)  # arrives in that save; step 3 is not periodic
    _, err = process.communicate(timeout=300)
    latest = checkpoints(tmp_path / "slow").latest()
    assert "stopped by signal 15" in err, err[-3000:]
    took = re.search(r"the last save took (\d+) s, more than is left of stop_grace_s=2;", err)
    assert took and int(took.group(1)) >= 6, err[-3000:]  # 6 s paused, plus the write itself
    assert latest.name == "step-00000002"
    assert f"resume from {latest}" in err
    assert not list((tmp_path / "slow" / "checkpoints").glob(".step-*.partial"))


def test_resume_is_decided_by_rank_0(write_config, tmp_path):
    """Rank 1 lists no checkpoint (a shared file system showing rank 0's rename late): both
    ranks still resume from rank 0's newest, instead of one loading (collectively) alone."""
    assert_ok(run_srpo(write_config("run", max_steps=2, checkpoint_every=1), 2))
    late = Path(__file__).parent / "late_listing"
    result = subprocess.run(
        srpo_command(write_config("run", max_steps=3, checkpoint_every=1), 2),
        cwd=REPO,
        env=run_env(PYTHONPATH=str(late)),
        capture_output=True,
        text=True,
        timeout=300,  # a rank left out of a collective would hang until then
    )
    assert_ok(result)
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert checkpoints(tmp_path / "run").latest().name == "step-00000003"


def test_only_rank_0_reads_the_base_weights(write_config, tmp_path):
    """The other ranks build the transformer on the meta device and receive their shards: on a
    node of 8 GPUs one host copy of the fp32 model, not 8."""
    loads = tmp_path / "loads.txt"
    result = subprocess.run(
        srpo_command(write_config("run", max_steps=1), 2),
        cwd=REPO,
        env=run_env(
            PYTHONPATH=str(Path(__file__).parent / "rank_loads"), SRPO_TEST_LOADS=str(loads)
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_ok(result)
    assert loads.read_text().split() == ["0"]
