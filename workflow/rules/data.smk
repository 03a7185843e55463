# Data: download (Zenodo sources only), preprocess to results/data/{dataset}, phantom figure.

# Run by Snakemake itself, never submitted: downloads need the login node's internet.
localrules:
    download,
    data_figure,


rule download:
    input:
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        f"{RESOURCES}/{{dataset}}/manifest.json",
    log:
        f"{RESULTS}/logs/download/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/download/{{dataset}}.tsv"
    resources:
        runtime=compute("data", "runtime"),
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg download --config {input.cfg:q} --dataset {wildcards.dataset:q} 2> {log:q}"


rule data:
    input:
        download_input,
        # A user's folder (datasets.X.path): a changed file there prepares the data again.
        lambda w: source_files(config["datasets"][w.dataset]),
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        split=f"{RESULTS}/data/{{dataset}}/split.csv",
        info=f"{RESULTS}/data/{{dataset}}/dataset.json",
    params:
        # Re-prepare when the dataset's entry changes (params are a rerun trigger).
        entry=lambda w: config["datasets"][w.dataset],
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{dataset}}.tsv"
    threads: compute("data", "threads")
    resources:
        cpus_per_task=compute("data", "threads"),
        mem_mb=compute("data", "mem_mb"),
        runtime=compute("data", "runtime"),
    conda:
        "../envs/diffseg.yaml"
    # --threads: up to this many cases at once (Snakemake caps {threads} at --cores on one machine).
    shell:
        "diffseg data --config {input.cfg:q} --dataset {wildcards.dataset:q} --threads {threads}"
        " 2> {log:q}"


rule data_figure:
    input:
        f"{RESULTS}/data/{{dataset}}/split.csv",
    output:
        report(
            f"{RESULTS}/figures/phantom_{{dataset}}.png",
            caption="../report/phantom.rst",
            category="Data",
        ),
    params:
        data=lambda w: f"{RESULTS}/data/{w.dataset}",
    log:
        f"{RESULTS}/logs/data/figure_{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/figure_{{dataset}}.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg data-figure --data {params.data:q} --out {output:q} 2> {log:q}"
