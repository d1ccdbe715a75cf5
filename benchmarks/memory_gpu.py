"""The measured parts of `srpo.memory`'s estimate, measured again on a real CUDA GPU.

    python -m benchmarks.memory_gpu --out gpu.json            # on the GPU machine
    python -m benchmarks.memory_gpu --fake --out fake.json    # the same parts on fake tensors

The same functions run (`run_transformer_call`, `run_decode_reward`) on the full-size models of
the config, built on the meta device and given GPU memory with `to_empty` (their values do not
matter to memory); the caching allocator's `max_memory_allocated` above the bytes before each
part is the figure. `--fake` gives the estimate's own figures for the same parts, so the two
JSON files compare line by line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from srpo.config import load_train_config
from srpo.flux import LatentGeometry
from srpo.memory import (
    CudaBytes,
    _build,
    a_branch,
    flux_for_measurement,
    flux_inputs,
    measure_decode_reward,
    measure_transformer_call,
    model_configs,
    reward_for_measurement,
    run_decode_reward,
    run_transformer_call,
    train_parameters,
)
from srpo.runtime.precision import POLICIES

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def _on_gpu(build, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build()
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    with torch.no_grad():  # finite values: garbage could hold NaNs
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model


def measure_on_gpu(config_json: str, vae_json: str, reward_json: str, spec: dict) -> dict:
    device = torch.device("cuda")
    config = json.loads(config_json)
    policy, tokens, text, px = spec["policy"], spec["image_tokens"], spec["text_tokens"], spec["px"]
    chosen = POLICIES[policy]
    model = _on_gpu(
        lambda: flux_for_measurement(config_json, True), chosen.transformer_dtype, device
    )
    train_parameters(model, True, False)
    result = {}
    with torch.device(device):
        inputs = flux_inputs(config, 2, tokens, text)
    call = run_transformer_call(model, inputs, policy, True, CudaBytes(device))
    result["call"] = call.__dict__
    print(policy, "call", result["call"], flush=True)
    for batch in spec["no_grad_batches"]:
        with torch.device(device):
            inputs = flux_inputs(config, batch, tokens, text)
        forward = run_transformer_call(model, inputs, policy, False, CudaBytes(device))
        result[f"no_grad_{batch}"] = forward.forward_peak
    del model, inputs
    torch.cuda.empty_cache()
    vae = _on_gpu(lambda: _build(vae_json, "vae"), chosen.vae_dtype, device)
    reward = _on_gpu(lambda: reward_for_measurement(reward_json), torch.float32, device)
    result["decode_reward"] = run_decode_reward(
        vae, reward, policy, px, px, a_branch(), CudaBytes(device)
    )
    del vae, reward
    torch.cuda.empty_cache()
    return result


def measure_fake(config_json: str, vae_json: str, reward_json: str, spec: dict) -> dict:
    policy, tokens, text, px = spec["policy"], spec["image_tokens"], spec["text_tokens"], spec["px"]
    call = measure_transformer_call(config_json, policy, True, 2, tokens, text)
    result = {"call": call.__dict__}
    for batch in spec["no_grad_batches"]:
        forward = measure_transformer_call(config_json, policy, True, batch, tokens, text, False)
        result[f"no_grad_{batch}"] = forward.forward_peak
    result["decode_reward"] = measure_decode_reward(vae_json, reward_json, policy, px, px)
    return result


@app.command()
def main(
    config: Annotated[
        Path, typer.Option(help="Training config whose models and resolution are measured.")
    ] = REPO / "config" / "train-paper.yaml",
    precision: Annotated[
        list[str] | None,
        typer.Option(help="Precision policies, repeatable. Default: every policy."),
    ] = None,
    no_grad_batch: Annotated[
        list[int] | None,
        typer.Option(help="Batches of the no-grad (rollout) forward, repeatable. Default: 1, 4."),
    ] = None,
    text_tokens: Annotated[int, typer.Option(help="T5 tokens of the prompt embeddings.")] = 512,
    fake: Annotated[
        bool, typer.Option(help="Measure on fake tensors (the estimate's figures), no GPU.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write the figures to this JSON file.")] = None,
) -> None:
    """Peak bytes of the transformer call, the rollout forward and one branch's decode+reward,
    per policy: on this machine's GPU, or with --fake as the estimate measures them."""
    train = load_train_config(config)
    models = model_configs(train)
    dumps = [json.dumps(part, sort_keys=True) for part in (models.transformer, models.vae)]
    reward_json = json.dumps(models.reward, sort_keys=True)
    scale = 2 ** (len(models.vae["block_out_channels"]) - 1)
    spec = {
        "image_tokens": LatentGeometry(train.height, train.width, scale).num_tokens,
        "text_tokens": text_tokens,
        "px": train.height,
        "no_grad_batches": no_grad_batch or [1, 4],
    }
    if train.height != train.width:
        raise typer.BadParameter("square resolutions only", param_hint="--config")
    figures: dict = {
        "device": "fake" if fake else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "spec": spec,
        "policies": {},
    }
    for policy in precision or list(POLICIES):
        started = time.perf_counter()
        measure = measure_fake if fake else measure_on_gpu
        part = measure(*dumps, reward_json, {**spec, "policy": policy})
        figures["policies"][policy] = part
        typer.echo(f"{policy} ({time.perf_counter() - started:.0f} s): {json.dumps(part)}")
    if out is not None:
        out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    app()
