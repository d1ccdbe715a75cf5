rule train_srpo:
    input:
        embeddings=f"{OUT}/embeddings/index.json",
        held_out=held_out_embeddings(),
        config=config["train"]["config"],
        models=train_model_files(),
    output:
        model=EXPORT,
    log:
        f"{OUT}/logs/train_srpo.log",
    benchmark:
        f"{OUT}/benchmarks/train_srpo.tsv"
    container:
        image_of("train_srpo")
    resources:
        mem_mb=resources("train_srpo", "mem_mb"),
        runtime=resources("train_srpo", "runtime"),
        cpus_per_task=resources("train_srpo", "cpus"),
        gpu=train_gpus("gpu"),
        gres=train_gpus("gres"),
        nodes=config["train"].get("nodes", 1),
        slurm_extra=resources("train_srpo", "slurm_extra", ""),
    params:
        launch=train_launcher(),
        base=base_model(),
        verify=verify_options(base_model(), *train_reward_paths()),
        folder=lambda wildcards, output: os.path.dirname(os.path.dirname(output.model)),
        held_out=lambda wildcards, input: (
            f"--eval-embeddings {input.held_out}" if input.held_out else ""
        ),
    shell:
        "{params.launch} train --config {input.config} --base-model {params.base}"
        " --embeddings {input.embeddings} {params.held_out} --output-dir {params.folder}"
        " {params.verify}"
        " > {log} 2>&1"
