"""Probe: do the data stage's heavy calls release the GIL (so that its threads can run at once)?

A worker thread repeats one call for ``--seconds`` while the main thread runs a tight Python loop
and records each gap between its own steps. A call that holds the GIL stalls the main thread for
most of the call, once per call; one that releases it stalls it only as long as the OS leaves the
thread unscheduled. Reported per call: its median duration, how many calls ran, and how many of the
main thread's gaps were longer than half a call (about one per call: the GIL is held). Controls
calibrate it: a C call that holds the GIL (a backtracking ``re.match``), a pure-Python loop (holds
it between the interpreter's 5 ms switches) and ``time.sleep`` (releases it).
This does not need an idle machine, unlike a speed-up: on a shared one (Linux autogroups share the
CPU per session, not per thread) extra threads cannot get more CPU, but a held GIL still shows.

The calls are those of one case of ``benchmarks/data_stage.py`` (a 256 × 256 × 100 int16 CT):
SimpleITK's read and resampling, zlib (de)compression (nibabel's .nii.gz), numpy's ``unique``.

Run:  python benchmarks/gil_probe.py [--seconds 3] [--out benchmarks/results/gil_probe_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_stage import machine, write_raw  # noqa: E402


def probe(call: Callable[[], Any], seconds: float) -> dict[str, float | int]:
    """Repeat ``call`` in a worker thread for ``seconds``; the main thread's stalls meanwhile."""
    stop = threading.Event()
    durations: list[float] = []

    def work() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            call()
            durations.append(time.perf_counter() - t)

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.1)
    gaps, start = [], time.perf_counter()
    last = start
    while last - start < seconds:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    stop.set()
    worker.join()
    median = float(np.median(durations))
    return {
        "call_ms": round(1000 * median, 1),
        "calls": len(durations),
        "stalls_over_half_a_call": sum(g > median / 2 for g in gaps),
        "longest_stall_ms": round(1000 * max(gaps), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per call")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/gil_probe_cpu.json")
    args = p.parse_args(argv)
    from diffseg.io import atomic_write_json

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # as a worker of the data stage runs it
    with tempfile.TemporaryDirectory() as tmp:
        write_raw(Path(tmp), 1, (256, 256, 100), (0.8, 0.8, 2.5), 117)
        path = str(Path(tmp) / "imagesTr/case_0000.nii.gz")
        image = sitk.ReadImage(path)
        volume = np.asarray(nib.load(path).dataobj).astype(np.float32)
        label = np.asarray(nib.load(path.replace("imagesTr", "labelsTr")).dataobj)  # uint8, 118 values
        raw = volume.tobytes()
        packed = zlib.compress(raw, 1)
        size = [int(round(n * s / 1.5)) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
        calls: dict[str, Callable[[], Any]] = {
            "SimpleITK ReadImage (.nii.gz)": lambda: sitk.ReadImage(path),
            "SimpleITK Resample (linear, to 1.5 mm)": lambda: sitk.Resample(
                image,
                size,
                sitk.Transform(),
                sitk.sitkLinear,
                image.GetOrigin(),
                [1.5] * 3,
                image.GetDirection(),
                0,
                image.GetPixelID(),
            ),  # fmt: skip
            "zlib compress (level 1)": lambda: zlib.compress(raw, 1),
            "zlib decompress": lambda: zlib.decompress(packed),
            "numpy unique (uint8 label, as check_labels)": lambda: np.unique(label),
            "numpy nonzero (uint8 label, as label_bbox)": lambda: np.nonzero(label),
            "control: Python loop (holds, switching every 5 ms)": lambda: sum(range(3_000_000)),
            # A regular expression's backtracking runs in C with the GIL held for the whole call.
            "control: re.match backtracking (C, holds)": lambda: re.match(r"(a|aa)*c", "a" * 30),
            "control: time.sleep (releases)": lambda: time.sleep(0.2),
        }
        rows = {}
        for name, call in calls.items():
            rows[name] = probe(call, args.seconds)
            print(f"{name:50s} {rows[name]}", flush=True)
    atomic_write_json(
        args.out,
        {"benchmark": "gil_probe", "load_average": [round(x, 2) for x in os.getloadavg()],
         "machine": machine(), "calls": rows},
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
