"""The HTML report (``snakemake --report``) renders every caption without a docutils system message.

The workflow runs on the stand-in stages of ``test_workflow.py`` (they write the data/train/test
output contract with synthetic content) for one table of two runs, so the report has every
category (tables, significance tests, figures, data) in a few seconds of jobs.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_workflow import SNAKEFILE, STAND_IN, TINY

# What docutils writes into the HTML for a problem in an rst text (class "system-message",
# "System Message: WARNING/2 (<string>, line 10)"), whatever its level.
SYSTEM_MESSAGE = re.compile(
    r"System Message|system-message|Duplicate explicit target|(?:INFO|WARNING|ERROR|SEVERE)/[1-4]"
)


def _report(tmp_path: Path) -> tuple[str, str]:
    """Run the stand-in workflow to its end, then ``--report``: (the report's HTML, snakemake's log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "diffseg"
    exe.write_text(STAND_IN.format(python=sys.executable))
    exe.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**os.environ, "PATH": path}
    cfg = copy.deepcopy(TINY)
    cfg["tables"] = {"table1": {"datasets": ["tiny"], "dims": ["3d"], "cells": {"N": "seg", "Y": "diff"}}}
    work = tmp_path / "w"
    work.mkdir()
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    base = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(work),
        "--configfile",
        str(work / "tiny.yaml"),
    ]
    res = subprocess.run([*base, "--cores", "2"], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    res = subprocess.run(
        [*base, "--report", str(work / "report.html")], capture_output=True, text=True, timeout=240, env=env
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return (work / "report.html").read_text(), res.stdout + res.stderr


@pytest.mark.slow
def test_report_has_no_docutils_system_message(tmp_path):
    html, log = _report(tmp_path)
    # Every rst text of the report (front page and captions) is in the HTML.
    for needle in (
        "diffseg reproduces",
        "Paired Student",
        "Spearman correlation",
        "Figure 2:",
        "Figure 3:",
        "procedural phantom",
    ):
        assert needle in html, needle
    found = sorted(set(SYSTEM_MESSAGE.findall(html)))
    assert not found, found
    assert "Duplicate explicit target" not in log and "System Message" not in log, log[-3000:]
