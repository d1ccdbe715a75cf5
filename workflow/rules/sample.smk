rule sample_eval:
    input:
        prompts=f"{OUT}/prompts/eval.csv",
        models=model_files(),
        transformer=transformer_input,
    output:
        manifest=f"{OUT}/samples/{{model}}/manifests/shard-{{shard}}-of-{SHARDS:03d}.json",
    log:
        f"{OUT}/logs/sample_eval/{{model}}-{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/sample_eval/{{model}}-{{shard}}.tsv"
    container:
        image_of("sample_eval")
    resources:
        mem_mb=resources("sample_eval", "mem_mb"),
        runtime=resources("sample_eval", "runtime"),
        cpus_per_task=resources("sample_eval", "cpus"),
        gpu=resources("sample_eval", "gpu"),
    params:
        base=base_model(),
        verify=verify_options(base_model()),
        folder=lambda wildcards, output: os.path.dirname(
            os.path.dirname(output.manifest)
        ),
        transformer=transformer_option,
        shard=lambda wildcards: f"{int(wildcards.shard)}/{SHARDS}",
        settings=" ".join(
            f"--{key.replace('_', '-')} {value}"
            for key, value in sorted(config["sample"].items())
            if key != "shards" and value is not None
        ),
    shell:
        "srpo sample --base-model {params.base} {params.transformer} --prompts {input.prompts}"
        " --out-dir {params.folder} --shard {params.shard} {params.settings} {params.verify}"
        " > {log} 2>&1"


rule gather_samples:
    input:
        expand(
            f"{OUT}/samples/{{{{model}}}}/manifests/shard-{{shard:03d}}-of-{SHARDS:03d}.json",
            shard=range(SHARDS),
        ),
    output:
        manifest=f"{OUT}/samples/{{model}}/manifest.json",
    log:
        f"{OUT}/logs/gather_samples/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/gather_samples/{{model}}.tsv"
    container:
        image_of("gather_samples")
    resources:
        mem_mb=resources("gather_samples", "mem_mb"),
        runtime=resources("gather_samples", "runtime"),
        cpus_per_task=resources("gather_samples", "cpus"),
        gpu=resources("gather_samples", "gpu"),
    params:
        folder=lambda wildcards, output: os.path.dirname(output.manifest),
        shards=SHARDS,
    shell:
        "srpo gather-samples {params.folder} --shards {params.shards} > {log} 2>&1"
