"""srpo-workflow: HPD prompts → text embeddings → SRPO training → sampling → scores → report.

Run from the repository root: `snakemake --cores 2` (embedded tiny default) or
`snakemake --profile slurm --configfile config/paper.yaml` (paper reproduction on Slurm).
"""

from snakemake.utils import min_version

min_version("9.0")


# The image of each rule's environment, under every config (config/containers.yaml).
configfile: "config/containers.yaml"


# The embedded tiny default, unless the command line names a config (--configfile or a
# profile's `configfile:`): then that file alone is the config, not a merge with the default.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/containers.smk"


rule all:
    default_target: True
    input:
        f"{OUT}/report/report.md",
