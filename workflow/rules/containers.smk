"""Containers under --sdm apptainer: every rule that runs a command has the image of its
environment (config/containers.yaml), pinned by digest; the log (a dry run's too) lists the
image of each rule. Under --lint, images not yet published give one notice, not a lint per rule.
Included last, once every rule exists."""

from snakemake_interface_executor_plugins.settings import DeploymentMethod

if DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
    check_containers()
    list_containers()
elif linting():
    lint_unpublished_images()
