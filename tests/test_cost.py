"""``diffseg cost``: the cost table from Snakemake's benchmark files and the jobs' device lines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from diffseg.cli import main
from diffseg.report.cost import cost_table, read_benchmark, read_device, to_markdown, training_seconds

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path, s, rss, cpu):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{s}\t0:00:{int(s)}\t{rss}\t1\t1\t1\t0\t0\t150.0\t{cpu}\n")


def _log(path, line):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"some output\ndiffseg: {line}\nstep 10/200\n")


def test_benchmark_and_device_lines_are_read_as_written(tmp_path):
    _bench(tmp_path / "b.tsv", 120.5, 2048.0, 230.0)
    assert read_benchmark(tmp_path / "b.tsv") == {"s": 120.5, "cpu_time": 230.0, "max_rss": 2048.0}
    missing = read_benchmark(tmp_path / "none.tsv")
    assert all(math.isnan(v) for v in missing.values())
    (tmp_path / "dash.tsv").write_text(HEADER + "3.0\t0:00:03\t-\t-\t-\t-\t-\t-\t-\t-\n")
    dash = read_benchmark(tmp_path / "dash.tsv")
    assert dash["s"] == 3.0 and math.isnan(dash["max_rss"]) and math.isnan(dash["cpu_time"])
    _log(tmp_path / "g.log", "backend gpu: 2 device(s), NVIDIA H100 80GB HBM3 (compute capability 9.0)")
    assert read_device(tmp_path / "g.log") == ("gpu: 2 × NVIDIA H100 80GB HBM3 (compute capability 9.0)", 2)
    _log(tmp_path / "t.log", "backend tpu: 8 device(s), TPU v3 (4 chip(s), 1 TensorCore(s) per device)")
    assert read_device(tmp_path / "t.log") == ("tpu: 8 × TPU v3 (4 chip(s), 1 TensorCore(s) per device)", 8)
    _log(tmp_path / "c.log", "backend cpu: 1 device(s), cpu")
    assert read_device(tmp_path / "c.log") == ("cpu: 1 × cpu", 0)
    assert read_device(tmp_path / "absent.log") == ("", 0)
    (tmp_path / "train_log.csv").write_text("step,loss\n1,1.0\n")  # no timings: unknown
    seconds, steps, sessions = training_seconds(tmp_path / "train_log.csv")
    assert math.isnan(seconds) and steps == 0 and sessions == 0


def test_cost_table_per_run_and_the_cli(tmp_path, capsys):
    res = tmp_path / "results"
    _bench(res / "benchmarks/train/ph/3d-diff.tsv", 600.0, 3072.0, 1100.0)
    _bench(res / "benchmarks/test/ph/3d-diff.tsv", 60.0, 1024.0, 90.0)
    _log(res / "logs/train/ph/3d-diff.log", "backend gpu: 1 device(s), NVIDIA H200")
    _log(res / "logs/test/ph/3d-diff.log", "backend gpu: 1 device(s), NVIDIA H200")
    (res / "runs/ph/3d-diff").mkdir(parents=True)
    # two sessions (interrupted at step 100, resumed): 350 s + 250 s; the last job ran 600 s
    (res / "runs/ph/3d-diff/train_log.csv").write_text(
        "step,loss,lr,seconds,steps_per_s,session,skipped\n50,1,0.1,200,1,0,0\n100,1,0.1,350,1,0,0\n"
        "150,1,0.1,120,1,1,0\n200,1,0.1,250,1,1,0\n"
    )
    _bench(res / "benchmarks/train/ph/2d-seg.tsv", 300.0, 1500.0, 580.0)
    _log(res / "logs/train/ph/2d-seg.log", "backend cpu: 1 device(s), cpu")
    table = cost_table(res, [("ph", "3d-diff"), ("ph", "2d-seg")])
    diff, seg = table.iloc[0], table.iloc[1]
    assert diff["train_s"] == 600.0 and diff["train_accel_s"] == 600.0 and diff["train_s_per_step"] == 3.0
    assert diff["train_sessions"] == 2 and diff["train_job_s"] == 600.0
    assert diff["test_cpu_s"] == 90.0 and diff["train_device"] == "gpu: 1 × NVIDIA H200"
    # a CPU run without train_log.csv: its training time is unknown, never the job's
    assert seg["train_accel_s"] == 0.0 and np.isnan(seg["train_s"]) and np.isnan(seg["train_s_per_step"])
    assert seg["train_job_s"] == 300.0
    assert np.isnan(seg["test_s"]) and np.isnan(seg["test_accel_s"])  # not tested
    assert seg["test_device"] == ""
    md = to_markdown(table)
    row = "| ph | `3d-diff` | 10.0 | 3.00 | 18.3 | 10.0 | 3.00 | 2 | 1.0 | 1.00 | gpu: 1 × NVIDIA H200 |"
    assert row in md
    assert "| ph | `2d-seg` | — | — | 9.7 | 0.0 | 1.46 | 0 | — | — | cpu: 1 × cpu |" in md
    out = tmp_path / "cost.csv"
    assert main(["cost", "--results", str(res), "--models", "ph/3d-diff", "ph/2d-seg", "--out", str(out),
                 "--markdown", str(tmp_path / "cost.md")]) == 0  # fmt: skip
    assert pd.read_csv(out)["train_job_s"].tolist() == [600.0, 300.0] and (tmp_path / "cost.md").is_file()
    assert main(["cost", "--results", str(res), "--models", "3d-diff", "--out", str(out)]) == 2
    assert "--models: each run as dataset/run" in capsys.readouterr().err
