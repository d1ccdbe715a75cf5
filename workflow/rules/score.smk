for _metric in SCORED:

    rule:
        name:
            f"score_{_metric}"
        input:
            samples=expand(f"{OUT}/samples/{{model}}/manifest.json", model=MODELS),
            weights=metric_files(_metric),
        output:
            scores=f"{OUT}/scores/{_metric}.parquet",
            csv=f"{OUT}/scores/{_metric}.csv",
        log:
            f"{OUT}/logs/score/{_metric}.log",
        benchmark:
            f"{OUT}/benchmarks/score/{_metric}.tsv"
        container:
            image_of(f"score_{_metric}")
        resources:
            mem_mb=resources(f"score_{_metric}", "mem_mb"),
            runtime=resources(f"score_{_metric}", "runtime"),
            cpus_per_task=resources(f"score_{_metric}", "cpus"),
            gpu=resources(f"score_{_metric}", "gpu"),
        params:
            srpo=metric_command(_metric),
            metric=_metric,
            samples=samples_option(),
            weights=metric_weights(_metric),
            verify=metric_verify(_metric),
            batch=config["metrics"][_metric].get("batch_size", 8),
        shell:
            "{params.srpo} score --metric {params.metric} {params.samples} {params.weights}"
            " {params.verify} --batch-size {params.batch} --out {output.scores} > {log} 2>&1"
