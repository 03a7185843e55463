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
    conda:
        conda_env("test")
    shell:
        "diffseg test --run-dir {params.run_dir:q} --data {params.data:q} --gpus {resources.gpu} 2> {log:q}"
