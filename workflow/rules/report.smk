# Report: Tables 1, 2 and 5 (CSV + markdown), t-tests and Spearman, Figures 2-3, training curves.
# No category may be named "Statistics" or "Workflow": Snakemake appends rst link targets of
# those names (its own panels) to every caption, and docutils reports the duplicate.


localrules:
    cost,
    status,
    table,
    stats,
    figure2,
    figure3,
    curves,


rule table:
    input:
        table_input,
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        csv=report(
            f"{RESULTS}/{{which}}.csv",
            caption="../report/tables.rst",
            category="Tables",
        ),
        md=report(f"{RESULTS}/{{which}}.md", caption="../report/tables.rst", category="Tables"),
    wildcard_constraints:
        which="|".join(TABLES),
    params:
        section=lambda w: config["tables"][w.which],  # rerun trigger
        runs=lambda w: f"{RESULTS}/runs",
    log:
        f"{RESULTS}/logs/report/{{which}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/{{which}}.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg table --which {wildcards.which:q} --config {input.cfg:q} --runs {params.runs:q}"
        " --out {output.csv:q} --markdown {output.md:q} 2> {log:q}"


rule stats:
    input:
        metrics_of(STATS_RUNS),
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        ttests=report(f"{RESULTS}/stats/ttests.csv", caption="../report/ttests.rst", category="Significance"),
        spearman=report(
            f"{RESULTS}/stats/spearman.csv", caption="../report/spearman.rst", category="Significance"
        ),
    params:
        tables=config["tables"],
        stats=config.get("stats"),
        runs=lambda w: f"{RESULTS}/runs",
    log:
        f"{RESULTS}/logs/report/stats.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/stats.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg stats --config {input.cfg:q} --runs {params.runs:q} --ttests {output.ttests:q}"
        " --spearman {output.spearman:q} 2> {log:q}"


rule figure3:
    input:
        metrics_of(figure3_models(config) if TABLE1 else []),
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        png=report(f"{RESULTS}/figures/figure3.png", caption="../report/figure3.rst", category="Figures"),
        pdf=f"{RESULTS}/figures/figure3.pdf",
        # Every class's numbers, whatever the class count (the figure's data).
        csv=report(f"{RESULTS}/figures/figure3.csv", caption="../report/figure3.rst", category="Figures"),
    params:
        table1=TABLE1,
        results=lambda w: RESULTS,
    log:
        f"{RESULTS}/logs/report/figure3.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/figure3.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg figure --which figure3 --config {input.cfg:q} --results {params.results:q}"
        " --out {output.png:q} {output.pdf:q} {output.csv:q} 2> {log:q}"


rule figure2:
    input:
        metrics_of(figure3_models(config) if TABLE1 else []),
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        png=report(f"{RESULTS}/figures/figure2.png", caption="../report/figure2.rst", category="Figures"),
        pdf=f"{RESULTS}/figures/figure2.pdf",
    params:
        table1=TABLE1,
        results=lambda w: RESULTS,
        figure2=config.get("figures", {}).get("figure2"),
    log:
        f"{RESULTS}/logs/report/figure2.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/figure2.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg figure --which figure2 --config {input.cfg:q} --results {params.results:q}"
        " --out {output.png:q} {output.pdf:q} 2> {log:q}"


REPORT_OUTPUTS += [f"{RESULTS}/figures/curves.{e}" for e in ("png", "pdf")]


rule curves:
    input:
        train=[f"{run_dir(d, r)}/train_log.csv" for d, r in RUNS],
        valid=[f"{run_dir(d, r)}/valid.csv" for d, r in RUNS],
    output:
        png=report(f"{RESULTS}/figures/curves.png", caption="../report/curves.rst", category="Figures"),
        pdf=f"{RESULTS}/figures/curves.pdf",
    params:
        runs=lambda w: f"{RESULTS}/runs",
        models=[f"{d}/{r}" for d, r in RUNS],
    log:
        f"{RESULTS}/logs/report/curves.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/curves.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg curves --runs {params.runs:q} --models {params.models:q} --out {output.png:q} {output.pdf:q} 2> {log:q}"


REPORT_OUTPUTS += [f"{RESULTS}/cost.{e}" for e in ("csv", "md")]


rule cost:
    # After every run's test job: their benchmark files and device lines are then written.
    input:
        metrics_of(RUNS),
    output:
        csv=report(f"{RESULTS}/cost.csv", caption="../report/cost.rst", category="Cost"),
        md=report(f"{RESULTS}/cost.md", caption="../report/cost.rst", category="Cost"),
    params:
        results=lambda w: RESULTS,
        models=[f"{d}/{r}" for d, r in RUNS],
    log:
        f"{RESULTS}/logs/report/cost.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/cost.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg cost --results {params.results:q} --models {params.models:q}"
        " --out {output.csv:q} --markdown {output.md:q} 2> {log:q}"


REPORT_OUTPUTS += [f"{RESULTS}/status.{e}" for e in ("csv", "md")]


rule status:
    # The campaign at the time of the report: every run's state, steps, best validation Dice, time.
    input:
        metrics_of(RUNS),
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        csv=report(f"{RESULTS}/status.csv", caption="../report/status.rst", category="Campaign"),
        md=report(f"{RESULTS}/status.md", caption="../report/status.rst", category="Campaign"),
    params:
        results=lambda w: RESULTS,
    log:
        f"{RESULTS}/logs/report/status.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/status.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg status --configfile {input.cfg:q} --results {params.results:q}"
        " --csv {output.csv:q} --markdown {output.md:q} > {log:q} 2>&1"


# Beyond the paper: Dice against sampling steps, uncertainty, seeds (diffseg.report.studies).
STEPS_RUNS = study_runs(config, "sampling_steps")
UNCERTAINTY_RUNS = study_runs(config, "uncertainty")
SEEDS = has_seeds(config)
if STEPS_RUNS:
    REPORT_OUTPUTS += [f"{RESULTS}/sampling_steps.{e}" for e in ("csv", "md")]
    REPORT_OUTPUTS += [f"{RESULTS}/figures/sampling_steps.{e}" for e in ("png", "pdf")]
if UNCERTAINTY_RUNS:
    REPORT_OUTPUTS += [f"{RESULTS}/uncertainty.{e}" for e in ("csv", "md")]
    REPORT_OUTPUTS += [f"{RESULTS}/figures/uncertainty.{e}" for e in ("png", "pdf", "csv")]
if SEEDS:
    REPORT_OUTPUTS += [f"{RESULTS}/figures/seeds.{e}" for e in ("png", "pdf", "csv")]


localrules:
    sampling_steps_report,
    uncertainty_report,
    seeds_figure,


rule sampling_steps_report:
    input:
        [f"{run_dir(d, r)}/sampling_steps/metrics.csv" for d, r in STEPS_RUNS],
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        csv=report(f"{RESULTS}/sampling_steps.csv", caption="../report/sampling_steps.rst", category="Beyond the paper"),
        md=f"{RESULTS}/sampling_steps.md",
        png=report(
            f"{RESULTS}/figures/sampling_steps.png", caption="../report/sampling_steps.rst", category="Beyond the paper"
        ),
        pdf=f"{RESULTS}/figures/sampling_steps.pdf",
    params:
        section=config.get("sampling_steps"),  # rerun trigger
        runs=lambda w: f"{RESULTS}/runs",
    log:
        f"{RESULTS}/logs/report/sampling_steps.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/sampling_steps.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg study --which sampling_steps --config {input.cfg:q} --runs {params.runs:q} --csv {output.csv:q}"
        " --markdown {output.md:q} --out {output.png:q} {output.pdf:q} 2> {log:q}"


rule uncertainty_report:
    input:
        [f"{run_dir(d, r)}/uncertainty/cases.csv" for d, r in UNCERTAINTY_RUNS],
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        csv=report(f"{RESULTS}/uncertainty.csv", caption="../report/uncertainty.rst", category="Beyond the paper"),
        md=f"{RESULTS}/uncertainty.md",
        png=report(
            f"{RESULTS}/figures/uncertainty.png", caption="../report/uncertainty.rst", category="Beyond the paper"
        ),
        pdf=f"{RESULTS}/figures/uncertainty.pdf",
        bins=f"{RESULTS}/figures/uncertainty.csv",
    params:
        section=config.get("uncertainty"),  # rerun trigger
        runs=lambda w: f"{RESULTS}/runs",
    log:
        f"{RESULTS}/logs/report/uncertainty.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/uncertainty.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg study --which uncertainty --config {input.cfg:q} --runs {params.runs:q} --csv {output.csv:q}"
        " --markdown {output.md:q} --bins {output.bins:q} --out {output.png:q} {output.pdf:q} 2> {log:q}"


rule seeds_figure:
    input:
        metrics_of(STATS_RUNS),
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        png=report(f"{RESULTS}/figures/seeds.png", caption="../report/seeds.rst", category="Beyond the paper"),
        pdf=f"{RESULTS}/figures/seeds.pdf",
        csv=report(f"{RESULTS}/figures/seeds.csv", caption="../report/seeds.rst", category="Beyond the paper"),
    params:
        tables=config["tables"],  # rerun trigger
        runs=lambda w: f"{RESULTS}/runs",
    log:
        f"{RESULTS}/logs/report/seeds.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/seeds.tsv"
    conda:
        "../envs/diffseg.yaml"
    shell:
        "diffseg study --which seeds --config {input.cfg:q} --runs {params.runs:q} --csv {output.csv:q}"
        " --out {output.png:q} {output.pdf:q} 2> {log:q}"
