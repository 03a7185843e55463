"""diffseg.report: the paper's tables, significance tests and figures from test metrics, the cost of
every run and the campaign's status; each module is imported where it is used (``diffseg.report.tables``).
"""
