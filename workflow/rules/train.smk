# Training: one job per (dataset, run); the run config is resolved once and saved beside it.

localrules:
    run_config,


rule run_config:
    output:
        f"{RESULTS}/runs/{{dataset}}/{{run}}/config.yaml",
    params:
        # The resolved config is a rerun trigger: change a variant and only its runs retrain.
        cfg=lambda w: resolve_run_config(config, w.dataset, w.run),
    log:
        f"{RESULTS}/logs/run_config/{{dataset}}/{{run}}.log",
    run:
        save_run_config(params.cfg, output[0])


rule train:
    input:
        cfg=f"{RESULTS}/runs/{{dataset}}/{{run}}/config.yaml",
        split=f"{RESULTS}/data/{{dataset}}/split.csv",
        # Its fingerprint ties the run to the data: changed data retrains (diffseg train decides).
        info=f"{RESULTS}/data/{{dataset}}/dataset.json",
    output:
        best=f"{RESULTS}/runs/{{dataset}}/{{run}}/best.json",
        log=f"{RESULTS}/runs/{{dataset}}/{{run}}/train_log.csv",
        valid=f"{RESULTS}/runs/{{dataset}}/{{run}}/valid.csv",
    params:
        data=lambda w: f"{RESULTS}/data/{w.dataset}",
        out=lambda w: run_dir(w.dataset, w.run),
        # compute.train.tasks > 1: srun starts one process per task, which join one run
        launch=launcher("train"),
    log:
        f"{RESULTS}/logs/train/{{dataset}}/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{dataset}}/{{run}}.tsv"
    threads: compute("train", "threads")
    resources:
        mem_mb=compute("train", "mem_mb"),
        runtime=compute("train", "runtime"),
        cpus_per_task=compute("train", "threads"),
        gpu=job_gpus("train"),
        gpu_model=compute("train", "gpu_model"),
        slurm_extra=compute("train", "slurm_extra"),
        tpu=tpu_chips("train"),
        tpus=compute("train", "tpu"),
        **task_resources("train"),
    conda:
        conda_env("train")
    shell:
        "{params.launch}diffseg train --run-config {input.cfg:q} --data {params.data:q} --out {params.out:q}"
        " --gpus {resources.gpu} --tpus {resources.tpus} 2> {log:q}"
