rule report:
    input:
        scores=score_files(),
        samples=expand(f"{OUT}/samples/{{model}}/manifest.json", model=MODELS),
        model=EXPORT,
    output:
        report=f"{OUT}/report/report.md",
        summary=report(
            f"{OUT}/report/tables/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
        ),
        tables=f"{OUT}/report/tables/tables.tex",
        tables_html=report(
            f"{OUT}/report/tables/tables.html",
            caption="../report/tables.rst",
            category="Tables",
        ),
        scores=report(
            f"{OUT}/report/figures/score_distributions.png",
            caption="../report/scores.rst",
            category="Figures",
        ),
        grid=report(
            f"{OUT}/report/figures/image_grid.png",
            caption="../report/grid.rst",
            category="Figures",
        ),
        curves=report(
            f"{OUT}/report/figures/training_curves.png",
            caption="../report/curves.rst",
            category="Figures",
        ),
    log:
        f"{OUT}/logs/report.log",
    benchmark:
        f"{OUT}/benchmarks/report.tsv"
    container:
        image_of("report")
    resources:
        mem_mb=resources("report", "mem_mb"),
        runtime=resources("report", "runtime"),
        cpus_per_task=resources("report", "cpus"),
        gpu=resources("report", "gpu"),
    params:
        baseline=shlex.quote(config["report"]["baseline"]),
        samples=samples_option(),
        run=shlex.quote(f"{config['report']['trained']}={OUT}/train/tensorboard"),
        folder=lambda wildcards, output: os.path.dirname(output.report),
        precision=config["report"].get("precision", 4),
        scores=lambda wildcards, input: " ".join(f"--scores {f}" for f in input.scores),
        configs=" ".join(shlex.quote(f"--config={path}") for path in WORKFLOW_CONFIGS),
        overrides=config_overrides(),
    shell:
        "srpo report {params.scores} --baseline {params.baseline} {params.samples}"
        " --training-run {params.run} {params.configs} {params.overrides}"
        " --out-dir {params.folder}"
        " --precision {params.precision} > {log} 2>&1"
