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
