"""The Markdown table of one `python -m benchmarks` result (committed beside its JSON)."""

from __future__ import annotations


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [
        f"# `python -m benchmarks --suite {result['suite']} --size {result['size']}`",
        "",
        f"{result['date']} · commit {result['commit'][:10]} · {result['machine']} · "
        f"{result['dtype']} · matmul peak {_f(result['gemm_peak_gflops'], 1)} GFLOP/s "
        f"({result['gemm_size']}² GEMM)",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in result["packages"].items()),
        "",
        "| model | ranks | step s: ours / literal / literal, no anomaly | ratio (b) | ratio (c) "
        "| peak MB: ours / literal | MFU ours / (c) | same loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        train = model["train_step"]
        seconds, memory = train["seconds"], train["peak_memory_mb"]
        lines.append(
            f"| {name} | {model['world_size']} | {_f(seconds['ours'])} / "
            f"{_f(seconds['literal'])} / {_f(seconds['literal-no-anomaly'])} | "
            f"{_f(train['ratio_vs_literal'])}× | {_f(train['ratio_vs_literal_no_anomaly'])}× | "
            f"{memory['ours']:.0f} / {memory['literal']:.0f} | "
            f"{_f(100 * train['mfu'], 1)}% / {_f(100 * train['mfu_literal_no_anomaly'], 1)}% | "
            f"{'yes' if train['losses_equal'] else 'NO'} |"
        )
    lines += [
        "",
        "LoRA (`lora:` defaults) against full fine-tuning, our trainer, same ranks and inputs:",
        "",
        "| model | rank | step s: full / LoRA | LoRA / full | peak MB: full / LoRA | LoRA / full "
        "| trainable parameters: full / LoRA | same first loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        train = model["train_step"]
        lora = train["lora"]
        seconds, memory = lora["seconds"], lora["peak_memory_mb"]
        counts = lora["trainable_parameters"]
        lines.append(
            f"| {name} | {lora['rank']} | {_f(seconds['full'])} / {_f(seconds['lora'])} | "
            f"{_f(train['lora_step_ratio'])}× | {memory['full']:.0f} / {memory['lora']:.0f} | "
            f"{_f(train['lora_peak_memory_ratio'])}× | {counts['full']:,} / {counts['lora']:,} | "
            f"{'yes' if lora['same_first_loss'] else 'NO'} |"
        )
    lines += [
        "",
        "Step seconds with the transformer phases scaled to FLUX.1-dev's 19 + 38 blocks by FLOPs "
        "(a prediction for this machine):",
        "",
        "| model | ours | literal | literal, no anomaly | scale |",
        "|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        depth = model["flux_dev_depth"]
        seconds = depth["step_seconds"]
        lines.append(
            f"| {name} | {_f(seconds['ours'], 1)} | {_f(seconds['literal'], 1)} | "
            f"{_f(seconds['literal-no-anomaly'], 1)} | {_f(depth['flops_factor'], 1)}× |"
        )
    lines += ["", "Per-phase seconds of one step (mean over ranks):", ""]
    phases = ("rollout", "branch_forward", "vae_decode", "reward", "backward", "optimizer")
    lines += ["| model | variant | " + " | ".join(phases) + " |", "|---|---|" + "---|" * 6]
    for name, model in result["models"].items():
        for variant, figures in model["train_step"]["phases"].items():
            cells = " | ".join(_f(figures.get(phase, 0.0)) for phase in phases)
            lines.append(f"| {name} | {variant} | {cells} |")
    lines += [
        "",
        "| model | stock img/s | ours img/s by batch | best / stock | diff @1 | diff @best "
        "| sampling MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model in result["models"].items():
        sampling = model["sampling"]
        ours = ", ".join(
            f"{batch}: {_f(figures['images_per_s'], 3)}"
            for batch, figures in sampling["ours"].items()
        )
        lines.append(
            f"| {name} | {_f(sampling['stock_images_per_s'], 3)} | {ours} | "
            f"{_f(sampling['ratio_vs_stock'])}× | {sampling['max_abs_pixel_diff']} | "
            f"{sampling['max_abs_pixel_diff_best_batch']} | {_f(100 * sampling['mfu'], 1)}% |"
        )
    if result["scaling"]:
        lines += [
            "",
            "| processes | step s | samples/s | peak MB per process | threads each | MFU |",
            "|---|---|---|---|---|---|",
        ]
        for world, row in result["scaling"].items():
            lines.append(
                f"| {world} | {_f(row['step_seconds'])} | {_f(row['samples_per_s'], 3)} | "
                f"{row['peak_memory_mb_per_process']:.0f} | {row['threads_per_process']} | "
                f"{_f(100 * row['mfu'], 1)}% |"
            )
    memory = result["memory_per_rank"]
    lines += [
        "",
        f"FLUX.1-dev ({memory['parameters'] / 1e9:.2f} B parameters), GB per rank under FSDP2:",
        "",
        "| ranks | sharded states | ours, gather_params: forward / rollout / first_call, step "
        "| literal FSDP1 fp32 |",
        "|---|---|---|---|",
    ]
    for world, row in memory["ranks"].items():
        lines.append(
            f"| {world} | {_f(row['sharded_states_gb'], 1)} | {_f(row['ours_forward_gb'], 1)} / "
            f"{_f(row['ours_rollout_gb'], 1)} / {_f(row['ours_step_gb'], 1)} | "
            f"{_f(row['literal_fsdp1_fp32_gb'], 1)} |"
        )
    projection = result["projection"]
    lines += [
        "",
        f"Projection to the paper recipe (32 ranks, 720 px, 19 updates), assumed MFU "
        f"{_f(100 * projection['assumed_mfu'], 1)}% ({projection['mfu_from']}):",
        "",
        "| GPU | ours min | literal min | literal, no anomaly min |",
        "|---|---|---|---|",
    ]
    for gpu, row in projection["gpus"].items():
        lines.append(
            f"| {gpu} | {_f(row['ours_minutes'], 1)} | {_f(row['literal_minutes'], 1)} | "
            f"{_f(row['literal_no_anomaly_minutes'], 1)} |"
        )
    return "\n".join(lines) + "\n"
