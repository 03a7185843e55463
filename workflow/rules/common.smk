# Shared helpers: the run matrix (from tables: + experiments:), paths and resources.
import re
import shutil
from pathlib import Path

import yaml

from diffseg.accelerators.slots import check_tpu_request, tpu_pool
from diffseg.config import resolve_run_config, save_run_config
from diffseg.data.prepare import source_files
from diffseg.errors import ConfigError
from diffseg.io import atomic_write_text
from diffseg.matrix import figure3_models, has_seeds, runs_needed, study_runs, table_runs
from diffseg.report.tables import metrics_path

RESULTS = config["results"]
RESOURCES = config["resources"]
DOWNLOADED = ("prostate_mr", "abdominal_ct")  # sources fetched from Zenodo
RUNS = runs_needed(config)  # [(dataset, run)]: every table cell and experiment
for _d, _r in RUNS:
    if _d not in config["datasets"]:
        raise ConfigError(f"config: run {_r!r} needs dataset {_d!r}, which is not under datasets:")
    # What the train and test jobs would assert (shape against the network, micro-batch, ...),
    # checked now, before any job runs: a config mistake is one message, not a failed job.
    resolve_run_config(config, _d, _r)
WORKFLOW_CONFIG = f"{RESULTS}/workflow_config.yaml"


def write_workflow_config():
    """The merged config (config files + --config) as one file for the diffseg CLI.

    Written while the workflow is parsed, and only when it changed, rather than by a rule:
    jobs read it as ancient() (a config change must not rerun every job), and a rule producing
    an ancient() input of every job made Snakemake schedule that rule alone, so a new ablation
    or `--configfile config/paper.yaml` after the demo took two invocations.
    """
    text = yaml.safe_dump(dict(config), sort_keys=False)
    path = Path(WORKFLOW_CONFIG)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


write_workflow_config()
TABLE1 = config["tables"].get("table1")


wildcard_constraints:
    dataset="|".join(re.escape(d) for d in config["datasets"]),
    run=r"(2d|3d)-[A-Za-z0-9_]+(-[A-Za-z0-9_]+)*",


def run_dir(dataset, run):
    return f"{RESULTS}/runs/{dataset}/{run}"


def metrics_of(pairs):
    return [str(metrics_path(f"{RESULTS}/runs", d, r)) for d, r in pairs]


COMPUTE_DEFAULTS = {
    "threads": 1, "mem_mb": 4000, "runtime": 60, "gpu": 0, "gpu_model": "", "slurm_extra": "", "tpu": 0,
    "tasks": 1, "nodes": 0,
}  # fmt: skip


def compute(stage, key):
    """A resource of a stage from config compute.{stage}.{key}, else COMPUTE_DEFAULTS (the schema's)."""
    return ((config.get("compute") or {}).get(stage) or {}).get(key, COMPUTE_DEFAULTS[key])


# TPU chips of this machine (0 off a TPU VM, e.g. a GPU box or a cluster's login node): what a job
# of `tpu: all` holds here.
TPU_HOST_CHIPS = len(tpu_pool())


def tasks(stage):
    """Processes of one job of the stage (compute.{stage}.tasks): several only for training, one run
    over several processes on JAX's distributed runtime (diffseg.distributed), launched by srun."""
    n = int(compute(stage, "tasks"))
    if n > 1 and stage != "train":
        raise ConfigError(f"compute.{stage}.tasks: {n}: only training runs as several processes")
    if n > 1 and not shutil.which("srun"):
        raise ConfigError(f"compute.{stage}.tasks: {n} needs SLURM (srun): --profile profiles/slurm")
    if n > 1 and int(compute(stage, "gpu")) > 1:
        raise ConfigError(
            f"compute.{stage}: tasks: {n} with gpu: {compute(stage, 'gpu')}: a run of several processes"
            " takes one GPU per process (gpu: 1, tasks: the GPUs of the job)"
        )
    return n


def launcher(stage):
    """What starts the stage's command: srun's tasks for a job of several (--kill-on-bad-exit: one
    task failing ends the others at once), else nothing (the plugin's own srun -n1 runs the job)."""
    n = tasks(stage)
    return f"srun -n {n} --kill-on-bad-exit=1 " if n > 1 else ""


def task_resources(stage):
    """The SLURM plugin's resources of a job of several tasks: `tasks` (sbatch --ntasks), `mpi` (the
    plugin then runs the rule's own srun instead of its srun -n1), `nodes` (--nodes; 0: SLURM's
    choice) and, with a GPU per task, `tasks_per_gpu: 1` (else the plugin asks --ntasks-per-gpu=tasks).
    None for one task: the job is submitted as before."""
    n = tasks(stage)
    if n <= 1:
        return {}
    res = {"tasks": n, "mpi": "srun"}
    if int(compute(stage, "nodes")):
        res["nodes"] = int(compute(stage, "nodes"))
    if int(compute(stage, "gpu")):
        res["tasks_per_gpu"] = 1
    return res


def job_gpus(stage):
    """GPUs of one job of the stage: compute.{stage}.gpu, per process when it has several tasks."""
    return int(compute(stage, "gpu")) * tasks(stage)


def tpu_chips(stage):
    """Resource `tpu`: the chips a job of the stage holds on this machine (`all`: every chip here),
    what `--resources tpu=N` counts, so that no more jobs start than the chips can run. A count that
    makes no box of them is refused while the rules are read, before any job runs."""
    return check_tpu_request(compute(stage, "tpu"), TPU_HOST_CHIPS, f"compute.{stage}.tpu")


def conda_env(stage):
    """The rule's environment under --sdm conda: TPU JAX where the stage asks for TPU chips and runs
    on this TPU VM or asks for no GPU (SLURM on TPU VMs), else CUDA JAX where it asks for GPUs."""
    tpu, gpu = compute(stage, "tpu") != 0, int(compute(stage, "gpu")) > 0
    if tpu and (TPU_HOST_CHIPS or not gpu):
        return "../envs/diffseg-tpu.yaml"
    return "../envs/diffseg-cuda.yaml" if gpu else "../envs/diffseg.yaml"


def download_input(wildcards):
    source = config["datasets"][wildcards.dataset]["source"]
    return [f"{RESOURCES}/{wildcards.dataset}/manifest.json"] if source in DOWNLOADED else []


def table_input(wildcards):
    return metrics_of(table_runs(config, wildcards.which))


TABLES = list(config["tables"])  # table1, table2 and any further ablation table (table5)
STATS_RUNS = sorted({p for t in TABLES for p in table_runs(config, t)})
USED = sorted({d for d, _ in RUNS})  # datasets some run needs
PHANTOMS = [d for d in USED if config["datasets"][d]["source"] == "phantom"]
REPORT_OUTPUTS = (
    [f"{RESULTS}/{t}.{ext}" for t in TABLES for ext in ("csv", "md")]
    + [f"{RESULTS}/stats/ttests.csv", f"{RESULTS}/stats/spearman.csv"]
    + metrics_of(RUNS)  # experiments: runs outside the tables are trained and tested too
    + [f"{RESULTS}/figures/phantom_{d}.png" for d in PHANTOMS]
)
if TABLE1:
    REPORT_OUTPUTS += [f"{RESULTS}/figures/figure{i}.{e}" for i in (2, 3) for e in ("png", "pdf")]
