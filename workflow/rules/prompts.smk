rule prepare_prompts:
    input:
        models=model_files(),
        train_file=config["prompts"].get("train_file") or [],
    output:
        train=f"{OUT}/prompts/train.txt",
        eval=f"{OUT}/prompts/eval.csv",
        manifest=f"{OUT}/prompts/manifest.json",
    log:
        f"{OUT}/logs/prepare_prompts.log",
    benchmark:
        f"{OUT}/benchmarks/prepare_prompts.tsv"
    container:
        image_of("prepare_prompts")
    resources:
        mem_mb=resources("prepare_prompts", "mem_mb"),
        runtime=resources("prepare_prompts", "runtime"),
        cpus_per_task=resources("prepare_prompts", "cpus"),
        gpu=resources("prepare_prompts", "gpu"),
    params:
        folder=lambda wildcards, output: os.path.dirname(output.manifest),
        source=config["prompts"]["source"],
        path=(
            f"--path {config['prompts']['path']}"
            if config["prompts"].get("path")
            else ""
        ),
        train_file=lambda wildcards, input: (
            f"--train-file {input.train_file}" if input.train_file else ""
        ),
        limits=" ".join(
            f"--{key.replace('_', '-')} {config['prompts'][key]}"
            for key in ("train_limit", "eval_per_style")
            if config["prompts"].get(key)
        ),
        seed=config["prompts"].get("seed", 42),
        cjk=config["prompts"].get("cjk", "keep"),
        base=base_model(),
        length=config["encode"]["max_sequence_length"],
    shell:
        "srpo prepare-prompts --out-dir {params.folder} --source {params.source} {params.path}"
        " {params.train_file} {params.limits} --seed {params.seed} --cjk {params.cjk}"
        " --base-model {params.base} --max-sequence-length {params.length} > {log} 2>&1"


rule encode_prompts:
    input:
        prompts=f"{OUT}/prompts/train.txt",
        models=model_files(),
    output:
        index=f"{OUT}/embeddings/index.json",
    log:
        f"{OUT}/logs/encode_prompts.log",
    benchmark:
        f"{OUT}/benchmarks/encode_prompts.tsv"
    container:
        image_of("encode_prompts")
    resources:
        mem_mb=resources("encode_prompts", "mem_mb"),
        runtime=resources("encode_prompts", "runtime"),
        cpus_per_task=resources("encode_prompts", "cpus"),
        gpu=resources("encode_prompts", "gpu"),
    params:
        base=base_model(),
        verify=verify_options(base_model()),
        launch=launcher(resources("encode_prompts", "gpu")),
        folder=lambda wildcards, output: os.path.dirname(output.index),
        length=config["encode"]["max_sequence_length"],
        batch=config["encode"].get("batch_size", 8),
        dtype=config["encode"].get("dtype", "float32"),
    shell:
        "{params.launch} encode --base-model {params.base} --prompts {input.prompts}"
        " --out-dir {params.folder} --max-sequence-length {params.length}"
        " --batch-size {params.batch} --dtype {params.dtype} {params.verify} > {log} 2>&1"


# The evaluation prompts, encoded for the trainer's held-out evaluation (never trained on).
rule encode_held_out:
    input:
        prompts=f"{OUT}/prompts/eval.csv",
        models=model_files(),
    output:
        index=f"{OUT}/embeddings-held-out/index.json",
    log:
        f"{OUT}/logs/encode_held_out.log",
    benchmark:
        f"{OUT}/benchmarks/encode_held_out.tsv"
    container:
        image_of("encode_prompts")
    resources:
        mem_mb=resources("encode_prompts", "mem_mb"),
        runtime=resources("encode_prompts", "runtime"),
        cpus_per_task=resources("encode_prompts", "cpus"),
        gpu=resources("encode_prompts", "gpu"),
    params:
        base=base_model(),
        verify=verify_options(base_model()),
        launch=launcher(resources("encode_prompts", "gpu")),
        folder=lambda wildcards, output: os.path.dirname(output.index),
        length=config["encode"]["max_sequence_length"],
        batch=config["encode"].get("batch_size", 8),
        dtype=config["encode"].get("dtype", "float32"),
    shell:
        "{params.launch} encode --base-model {params.base} --prompts {input.prompts}"
        " --out-dir {params.folder} --max-sequence-length {params.length}"
        " --batch-size {params.batch} --dtype {params.dtype} {params.verify} > {log} 2>&1"
