# Evaluation: segment the test split with the best checkpoint, write per-case metrics.


rule test:
    input:
        best=f"{RESULTS}/runs/{{dataset}}/{{run}}/best.json",
        split=f"{RESULTS}/data/{{dataset}}/split.csv",
    output:
        f"{RESULTS}/runs/{{dataset}}/{{run}}/test/metrics.csv",
    params:
        data=lambda w: f"{RESULTS}/data/{w.dataset}",
        run_dir=lambda w: run_dir(w.dataset, w.run),
    log:
        f"{RESULTS}/logs/test/{{dataset}}/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/test/{{dataset}}/{{run}}.tsv"
    threads: compute("test", "threads")
    resources:
        mem_mb=compute("test", "mem_mb"),
        runtime=compute("test", "runtime"),
        cpus_per_task=compute("test", "threads"),
        gpu=compute("test", "gpu"),
        gpu_model=compute("test", "gpu_model"),
        slurm_extra=compute("test", "slurm_extra"),
        tpu=tpu_chips("test"),
        tpus=compute("test", "tpu"),
    conda:
        conda_env("test")
    shell:
        "diffseg test --run-dir {params.run_dir:q} --data {params.data:q}"
        " --gpus {resources.gpu} --tpus {resources.tpus} 2> {log:q}"


# Beyond the paper: a trained diffusion run's test split at several sampling steps K, and N samples
# per case for the uncertainty study (config sampling_steps:, uncertainty:; test-stage resources).
rule sampling_steps:
    input:
        best=f"{RESULTS}/runs/{{dataset}}/{{run}}/best.json",
        split=f"{RESULTS}/data/{{dataset}}/split.csv",
    output:
        f"{RESULTS}/runs/{{dataset}}/{{run}}/sampling_steps/metrics.csv",
    params:
        data=lambda w: f"{RESULTS}/data/{w.dataset}",
        run_dir=lambda w: run_dir(w.dataset, w.run),
        steps=" ".join(str(k) for k in (config.get("sampling_steps") or {}).get("steps", [])),
    log:
        f"{RESULTS}/logs/sampling_steps/{{dataset}}/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sampling_steps/{{dataset}}/{{run}}.tsv"
    threads: compute("test", "threads")
    resources:
        mem_mb=compute("test", "mem_mb"),
        runtime=compute("test", "runtime"),
        cpus_per_task=compute("test", "threads"),
        gpu=compute("test", "gpu"),
        gpu_model=compute("test", "gpu_model"),
        slurm_extra=compute("test", "slurm_extra"),
        tpu=tpu_chips("test"),
        tpus=compute("test", "tpu"),
    conda:
        conda_env("test")
    shell:
        "diffseg sampling-steps --run-dir {params.run_dir:q} --data {params.data:q} --steps {params.steps}"
        " --gpus {resources.gpu} --tpus {resources.tpus} 2> {log:q}"


rule uncertainty:
    input:
        best=f"{RESULTS}/runs/{{dataset}}/{{run}}/best.json",
        split=f"{RESULTS}/data/{{dataset}}/split.csv",
    output:
        cases=f"{RESULTS}/runs/{{dataset}}/{{run}}/uncertainty/cases.csv",
        histogram=f"{RESULTS}/runs/{{dataset}}/{{run}}/uncertainty/histogram.csv",
    params:
        data=lambda w: f"{RESULTS}/data/{w.dataset}",
        run_dir=lambda w: run_dir(w.dataset, w.run),
        samples=(config.get("uncertainty") or {}).get("samples", 8),
    log:
        f"{RESULTS}/logs/uncertainty/{{dataset}}/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/uncertainty/{{dataset}}/{{run}}.tsv"
    threads: compute("test", "threads")
    resources:
        mem_mb=compute("test", "mem_mb"),
        runtime=compute("test", "runtime"),
        cpus_per_task=compute("test", "threads"),
        gpu=compute("test", "gpu"),
        gpu_model=compute("test", "gpu_model"),
        slurm_extra=compute("test", "slurm_extra"),
        tpu=tpu_chips("test"),
        tpus=compute("test", "tpu"),
    conda:
        conda_env("test")
    shell:
        "diffseg uncertainty --run-dir {params.run_dir:q} --data {params.data:q} --samples {params.samples}"
        " --gpus {resources.gpu} --tpus {resources.tpus} 2> {log:q}"
