# diffseg: the paper's experiments as a graph of jobs (docs/DEFINITIONS.md). Thin: logic lives in diffseg.
#   snakemake --cores all                       # the phantom demo (config/config.yaml)
#   snakemake --profile profiles/slurm --configfile config/paper.yaml
from snakemake.utils import min_version, validate

from diffseg.config import validate_config

min_version("8.10")


# The demo config is the default; a --configfile (config/paper.yaml, your own) replaces it
# rather than being merged over it, so the paper never inherits the demo's small settings.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Errors name the bad key (jsonschema's path); fills the schema's defaults (results, compute...).
validate(config, "workflow/schemas/config.schema.yaml", set_default=True)
# Every nested key too (variants, dims, training, datasets), with "did you mean" for typos.
validate_config(config)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        REPORT_OUTPUTS,
