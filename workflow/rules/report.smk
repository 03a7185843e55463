# Report: Tables 1, 2 and 5 (CSV + markdown), t-tests and Spearman, Figures 2-3.
# No category may be named "Statistics" or "Workflow": Snakemake appends rst link targets of
# those names (its own panels) to every caption, and docutils reports the duplicate.
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
        md=f"{RESULTS}/{{which}}.md",
    wildcard_constraints:
        which="|".join(TABLES),
    params:
        section=lambda w: config["tables"][w.which],  # rerun trigger
        runs=lambda w: f"{RESULTS}/runs",
    log:
        f"{RESULTS}/logs/report/{{which}}.log",
    conda:
        "../../environment.yml"
    shell:
        "diffseg table --which {wildcards.which} --config {input.cfg} --runs {params.runs}"
        " --out {output.csv} --markdown {output.md} 2> {log}"


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
    conda:
        "../../environment.yml"
    shell:
        "diffseg stats --config {input.cfg} --runs {params.runs} --ttests {output.ttests}"
        " --spearman {output.spearman} 2> {log}"


rule figure3:
    input:
        metrics_of(figure3_models(config) if TABLE1 else []),
        cfg=ancient(WORKFLOW_CONFIG),
    output:
        png=report(f"{RESULTS}/figures/figure3.png", caption="../report/figure3.rst", category="Figures"),
        pdf=f"{RESULTS}/figures/figure3.pdf",
    params:
        table1=TABLE1,
        results=lambda w: RESULTS,
    log:
        f"{RESULTS}/logs/report/figure3.log",
    conda:
        "../../environment.yml"
    shell:
        "diffseg figure --which figure3 --config {input.cfg} --results {params.results}"
        " --out {output.png} {output.pdf} 2> {log}"


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
    conda:
        "../../environment.yml"
    shell:
        "diffseg figure --which figure2 --config {input.cfg} --results {params.results}"
        " --out {output.png} {output.pdf} 2> {log}"
