rule build_tiny_models:
    output:
        manifest=f"{OUT}/models/manifest.json",
    log:
        f"{OUT}/logs/build_tiny_models.log",
    benchmark:
        f"{OUT}/benchmarks/build_tiny_models.tsv"
    container:
        image_of("build_tiny_models")
    resources:
        mem_mb=resources("build_tiny_models", "mem_mb"),
        runtime=resources("build_tiny_models", "runtime"),
        cpus_per_task=resources("build_tiny_models", "cpus"),
        gpu=resources("build_tiny_models", "gpu"),
    params:
        folder=lambda wildcards, output: os.path.dirname(output.manifest),
    shell:
        "srpo make-tiny {params.folder} > {log} 2>&1"


# The tiny models of metrics in environments of their own (hpsv3, imagereward): each built by
# that environment's `srpo`, next to the others, with its own manifest; a job only where a
# scored metric's weights come from it.
for _part in metric_env_parts():

    rule:
        name:
            f"build_tiny_{_part}"
        output:
            manifest=f"{OUT}/models/manifest-{_part}.json",
        log:
            f"{OUT}/logs/build_tiny_{_part}.log",
        benchmark:
            f"{OUT}/benchmarks/build_tiny_{_part}.tsv"
        container:
            image_of(f"build_tiny_{_part}")
        resources:
            mem_mb=resources(f"build_tiny_{_part}", "mem_mb"),
            runtime=resources(f"build_tiny_{_part}", "runtime"),
            cpus_per_task=resources(f"build_tiny_{_part}", "cpus"),
            gpu=resources(f"build_tiny_{_part}", "gpu"),
        params:
            srpo=srpo_of(rule_env(f"build_tiny_{_part}")),
            folder=lambda wildcards, output: os.path.dirname(output.manifest),
            part=_part,
        shell:
            "{params.srpo} make-tiny {params.folder} --part {params.part} > {log} 2>&1"
