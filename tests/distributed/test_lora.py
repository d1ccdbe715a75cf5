"""LoRA (`lora:` in the training config) under the same FSDP2 + DCP + exact-resume path as full
fine-tuning: global batch, SIGTERM + resume, small checkpoints, and an export that diffusers'
`load_lora_weights` and the released quick start both load."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import (
    assert_ok,
    checkpoints,
    run_srpo,
    start_srpo,
    terminate_once_resumed,
    tiny_config,
)
from torch.distributed.checkpoint import FileSystemReader

from srpo.config import LoraConfig
from srpo.flux import load_transformer
from srpo.io import InputError
from srpo.train.checkpoint import EXPORT_SOURCE, export_checkpoint
from srpo.train.lora import LORA_WEIGHTS, add_lora

pytestmark = pytest.mark.distributed

LORA = {"rank": 4, "alpha": 8}
STEPS = 3
MERGED = "diffusion_pytorch_model.safetensors"


def exported(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / name))


@pytest.fixture(scope="module")
def runs(tiny_models: Path, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same LoRA run (global batch 2, STEPS steps) on one process and on two."""
    root = tmp_path_factory.mktemp("lora")
    for name, nproc in (("one", 1), ("two", 2)):
        config = tiny_config(tiny_models, tiny_cache, root / name, max_steps=STEPS, lora=LORA)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert_ok(run_srpo(path, nproc))
    return root


def stored_tensors(checkpoint: Path) -> dict[str, int]:
    """Element count of every tensor a DCP checkpoint holds, from its metadata."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {key: math.prod(item.size) for key, item in metadata.items() if hasattr(item, "size")}


def adapted_modules(lora_file: dict[str, torch.Tensor]) -> set[str]:
    """`transformer.<module>.lora_A.weight` keys of diffusers' LoRA file → module names."""
    return {key.removeprefix("transformer.").split(".lora_")[0] for key in lora_file}


def test_two_ranks_match_one_rank(runs):
    """2 processes × 1 sample give the same adapters as 1 process × 2 samples, to float
    rounding as for full fine-tuning (a batched rollout and another order of the gradient sum
    change the last bits): the initial adapters come from one seed, whatever the world size."""
    for name in (LORA_WEIGHTS, MERGED):
        single, double = exported(runs / "one", name), exported(runs / "two", name)
        assert single.keys() == double.keys()
        for key in single:
            torch.testing.assert_close(double[key], single[key], rtol=1e-5, atol=1e-6, msg=key)


def test_only_the_adapters_train_and_are_checkpointed(runs, tiny_models):
    """The merged export differs from the base in the adapted weights alone; the checkpoint
    holds the adapters and their AdamW state only: here 3.3% of a full one."""
    base_file = tiny_models / "flux" / "transformer" / MERGED
    base = load_file(str(base_file))
    adapters = exported(runs / "one", LORA_WEIGHTS)
    modules = adapted_modules(adapters)
    assert len(modules) == 11  # 8 projections of the double block + q, k, v of the single one
    merged = exported(runs / "one", MERGED)
    assert merged.keys() == base.keys()
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed == {f"{module}.weight" for module in modules}
    assert all(adapters[key].abs().sum() > 0 for key in adapters if ".lora_B." in key)

    stored = stored_tensors(checkpoints(runs / "one").latest())
    models = [key for key in stored if key.startswith("app.model.")]
    assert len(models) == len(adapters) and all(".lora_" in key for key in models)
    adapter_size = sum(tensor.numel() for tensor in adapters.values())
    # the adapters, AdamW's two moments of each, and one step count per adapter tensor
    assert sum(stored.values()) == 3 * adapter_size + len(adapters)
    assert 3 * adapter_size < 0.05 * 3 * sum(tensor.numel() for tensor in base.values())


def test_sigterm_then_resume_is_bitwise_equal(write_config, runs, tmp_path):
    """Step 1, then a run SIGTERMed as soon as it resumed (it stops after step 2), then the
    rest: the same bits as the uninterrupted 2-process run, in both exports."""
    assert_ok(run_srpo(write_config("stopped", max_steps=1, lora=LORA), 2))
    config = write_config("stopped", max_steps=STEPS, lora=LORA)
    process = start_srpo(config, 2)
    err = terminate_once_resumed(process)
    assert process.returncode != 0
    assert "stopped by signal 15" in err, err[-3000:]
    assert checkpoints(tmp_path / "stopped").latest().name == "step-00000002", err[-3000:]

    resumed = run_srpo(config, 2)
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout
    for name in (LORA_WEIGHTS, MERGED):
        want, got = exported(runs / "two", name), exported(tmp_path / "stopped", name)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[key], got[key]) for key in want), name


def test_export_loads_with_load_lora_weights_and_the_quick_start(runs, tiny_models):
    """`load_lora_weights(model/)` on the stock pipeline and the quick start's
    `load_state_dict(load_file(merged))` give the same weights and the same image."""
    from diffusers import FluxPipeline

    base, model = tiny_models / "flux", runs / "two" / "model"
    quick = FluxPipeline.from_pretrained(str(base))
    quick.transformer.load_state_dict(load_file(str(model / MERGED)))
    adapted = FluxPipeline.from_pretrained(str(base))
    adapted.load_lora_weights(str(model))
    options = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "pt"}
    images = [
        pipe(
            "a cat", generator=torch.Generator().manual_seed(0), max_sequence_length=32, **options
        ).images
        for pipe in (quick, adapted)
    ]
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-4)

    adapted.transformer.fuse_lora()
    adapted.transformer.unload_lora()
    merged = quick.transformer.state_dict()
    fused = adapted.transformer.state_dict()
    assert fused.keys() == merged.keys()
    assert all(torch.equal(fused[key], merged[key]) for key in merged)


def test_export_without_merge_holds_the_adapters_alone(runs, tiny_models, tmp_path):
    """`lora.export_merged: false`, through `srpo export`'s function on a copy of the run's
    checkpoint (export reads the `lora` section from the checkpoint's own provenance)."""
    checkpoint = tmp_path / "step-00000003"
    shutil.copytree(checkpoints(runs / "one").latest(), checkpoint)
    provenance = json.loads((checkpoint / "provenance.json").read_text())
    provenance["config"]["lora"]["export_merged"] = False
    (checkpoint / "provenance.json").write_text(json.dumps(provenance))
    out = export_checkpoint(
        checkpoint, str(tiny_models / "flux"), tmp_path / "model", torch.float32
    )
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [LORA_WEIGHTS, "provenance.json", EXPORT_SOURCE]
    )
    want, got = exported(runs / "one", LORA_WEIGHTS), load_file(str(out / LORA_WEIGHTS))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_unknown_target_module_is_one_line(tiny_flux):
    with pytest.raises(InputError, match=r"^lora.target_modules: 'to_qkv' names no module"):
        add_lora(load_transformer(str(tiny_flux)), LoraConfig(target_modules=("to_qkv",)), 0)


def test_resume_with_another_lora_section_is_one_line(runs, tiny_models, tiny_cache, tmp_path):
    """A LoRA checkpoint resumed as full fine-tuning (or another rank) stops before any tensor
    is read, naming both settings."""
    shutil.copytree(runs / "one" / "checkpoints", tmp_path / "changed" / "checkpoints")
    for lora in (None, {"rank": 8}):
        config = tiny_config(tiny_models, tiny_cache, tmp_path / "changed", max_steps=STEPS + 1)
        config["lora"] = lora
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump(config))
        result = run_srpo(path, None)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, result.stderr[-2000:]
        assert f"step-{STEPS:08d}: checkpoint was written with lora={{'alpha': 8" in lines[0]
        assert "'rank': 4" in lines[0]
        assert f"the config says {'None' if lora is None else '{'}" in lines[0]
        assert "resume needs the same value" in lines[0]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"reward": {"kind": "pickscore"}}, "reward.kind=hpsv2"),
        ({"srpo": {"reward_threshold": 0.5}}, "srpo={}"),
        ({"height": 32, "width": 32}, "height=64"),
    ],
)
def test_resume_of_another_run_is_one_line(runs, tiny_models, tiny_cache, tmp_path, change, named):
    """A checkpoint resumed with another reward, optimizer, SRPO setting or image size (what a
    workflow re-run after such an edit would do) stops before any tensor is read, naming the
    key and how to train afresh: continuing would be neither run."""
    shutil.copytree(runs / "one" / "checkpoints", tmp_path / "changed" / "checkpoints")
    config = tiny_config(tiny_models, tiny_cache, tmp_path / "changed", max_steps=STEPS + 1,
                         lora=LORA, **change)  # fmt: skip
    if "reward" in change:
        config["reward"] = {"kind": "pickscore", "model_path": str(tiny_models / "pickscore")}
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_srpo(path, None)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert f"step-{STEPS:08d}: checkpoint was written with {named}" in lines[0]
    assert f"(to train afresh, remove {tmp_path / 'changed' / 'checkpoints'})" in lines[0]


def test_resume_with_moved_reward_files_and_more_steps(runs, tiny_models, tiny_cache, tmp_path):
    """The reward's files may move and the run may be extended: the resume goes on."""
    shutil.copytree(runs / "one" / "checkpoints", tmp_path / "moved" / "checkpoints")
    shutil.copytree(tiny_models / "hpsv2", tmp_path / "hpsv2")
    config = tiny_config(tiny_models, tiny_cache, tmp_path / "moved", max_steps=STEPS + 1,
                         lora=LORA)  # fmt: skip
    config["reward"].update(
        checkpoint=str(tmp_path / "hpsv2" / "HPS_v2.1_compressed.pt"),
        model_config_path=str(tmp_path / "hpsv2" / "open_clip_config.json"),
    )
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_srpo(path, None)
    assert_ok(result)
    assert f"at step {STEPS}" in result.stdout, result.stdout[-2000:]
