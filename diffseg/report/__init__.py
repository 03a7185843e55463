"""diffseg.report: the paper's tables, significance tests and figures from test metrics."""

from diffseg.report.stats import paired_tests, spearman
from diffseg.report.tables import build_table, summarise, to_markdown

__all__ = ["build_table", "paired_tests", "spearman", "summarise", "to_markdown"]
