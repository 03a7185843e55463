"""Benchmark: the data stage (``diffseg data``) against the number of cases and of workers.

A synthetic many-class set of raw CT scans in the MSD layout (``dataset.json``, ``imagesTr/``,
``labelsTr/``), like TotalSegmentator's: ``--classes`` foreground classes (117 by default) in each
label, int16 HU images of ``--size`` voxels at ``--raw-spacing`` mm (anisotropic, so every case is
resampled), prepared onto ``--spacing`` mm and ``--shape`` voxels with a 70/10/20 % random split.
Each (cases, workers, pool) point runs ``diffseg data --threads W --pool P`` in a fresh child
process, in rounds over every point (``--repeats``), and records its wall time (interpreter start
included) and the command's own time (after its imports), cases/s, CPU seconds, the child's peak
RSS (``ru_maxrss``), the largest worker's (process pool) and the whole process tree's (psutil,
sampled every 50 ms). The runs of one case count must give the same dataset fingerprint
(checked: the benchmark fails otherwise).

Run:  python benchmarks/data_stage.py [--cases 8 16 32] [--workers 1 2] [--pool thread process]
          [--size 256 256 100] [--raw-spacing 0.8 0.8 2.5] [--spacing 1.5 1.5 1.5]
          [--shape 128 128 176] [--classes 117] [--repeats 1] [--keep DIR]
          [--out benchmarks/results/data_stage_cpu.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from timing import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def make_case(
    rng: np.random.Generator, size: tuple[int, int, int], spacing: tuple[float, float, float], classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT: ``(image int16 HU (X, Y, Z), label uint8 (X, Y, Z))`` of ``size`` voxels.

    The body is an elliptic cylinder of soft tissue (~40 HU) in air (-1000 HU); inside it the
    ``classes`` organs are the cells of a jittered box grid (each cell one class, shuffled per case,
    so every class is present with a size that varies from case to case), each with its own mean
    HU; Gaussian noise (sd 20 HU) over all. Built from broadcast 1D index arrays, so a
    256 × 256 × 100 case takes well under a second.
    """
    nx, ny, nz = size
    x = (np.arange(nx) - nx / 2 + 0.5) * spacing[0]
    y = (np.arange(ny) - ny / 2 + 0.5) * spacing[1]
    # Body: an ellipse filling ~85 % of the field of view in-plane, the whole length along z.
    ax, ay = 0.45 * nx * spacing[0], 0.35 * ny * spacing[1]
    body = (x[:, None] / ax) ** 2 + (y[None, :] / ay) ** 2 <= 1.0  # (X, Y)
    # Organ grid: g × g × g cells over the body's bounding box, cut at jittered positions.
    g = int(np.ceil(classes ** (1 / 3)))
    cuts = []
    for n, lo, hi in ((nx, nx / 2 - ax / spacing[0], nx / 2 + ax / spacing[0]),
                      (ny, ny / 2 - ay / spacing[1], ny / 2 + ay / spacing[1]),
                      (nz, 0, nz)):  # fmt: skip
        edges = np.linspace(lo, hi, g + 1)[1:-1] + rng.uniform(-0.3, 0.3, g - 1) * (hi - lo) / g
        cuts.append(np.searchsorted(edges, np.arange(n), side="right"))  # cell index per voxel
    cell = (cuts[0][:, None, None] * g + cuts[1][None, :, None]) * g + cuts[2][None, None, :]
    # g**3 >= classes cells: the first `classes` of a per-case shuffle are organs, the rest tissue.
    organ_of_cell = np.zeros(g**3, np.uint8)
    organ_of_cell[rng.permutation(g**3)[:classes]] = np.arange(1, classes + 1, dtype=np.uint8)
    label = organ_of_cell[cell] * body[:, :, None]
    # A one-voxel wall of tissue between neighbouring cells, as between organs.
    border = np.zeros(size, bool)
    for axis in range(3):
        border |= np.diff(cell, axis=axis, prepend=-1) != 0
    label[border] = 0
    hu = np.linspace(-100.0, 300.0, classes + 1)
    hu[0] = 40.0
    image = np.where(body[:, :, None], hu[label], -1000.0)
    image += rng.normal(0.0, 20.0, size)
    return image.astype(np.int16), label.astype(np.uint8)


def write_raw(
    root: Path, cases: int, size: tuple[int, int, int], spacing: tuple[float, float, float], classes: int
) -> list[str]:
    """Write ``cases`` synthetic cases under ``root/imagesTr``, ``root/labelsTr`` (kept if present).

    Returns the case uids, ``case_0000`` ... The affine is LPS-flipped in-plane (as scanners write),
    so the reading path's orientation handling is exercised too.
    """
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    uids = []
    for i in range(cases):
        uid = f"case_{i:04d}"
        uids.append(uid)
        img_path, lab_path = root / "imagesTr" / f"{uid}.nii.gz", root / "labelsTr" / f"{uid}.nii.gz"
        if img_path.is_file() and lab_path.is_file():
            continue
        image, label = make_case(np.random.default_rng(i), size, spacing, classes)
        for path, arr in ((lab_path, label), (img_path, image)):  # image last: it marks a complete case
            path.parent.mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(arr, affine)
            img.header.set_zooms(spacing)
            nib.save(img, str(path))
    return uids


def write_task(folder: Path, raw: Path, uids: list[str], classes: int) -> Path:
    """An MSD ``dataset.json`` in ``folder`` listing ``uids`` of ``raw`` (a subset of one raw set)."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(raw, folder)
    meta = {
        "name": "SyntheticTotalSeg",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(c): f"organ_{c:03d}" for c in range(1, classes + 1)}},
        "numTraining": len(uids),
        "training": [
            {"image": f"{rel}/imagesTr/{u}.nii.gz", "label": f"{rel}/labelsTr/{u}.nii.gz"} for u in uids
        ],
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def write_config(path: Path, task: Path, results: Path, cases: int, args: argparse.Namespace) -> Path:
    """A workflow config with one dataset, ``bench``, reading ``task`` (a 70/10/20 % random split)."""
    import yaml

    valid, test = max(1, cases // 10), max(1, cases // 5)
    cfg = {
        "results": str(results),
        "resources": str(results / "resources"),
        "datasets": {
            "bench": {
                "source": "msd",
                "path": str(task),
                "spacing": list(args.spacing),
                "shape": list(args.shape),
                "clip": [-991.0, 362.0],
                "seed": 0,
                "split": {"train": cases - valid - test, "valid": valid, "test": test},
            }
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants now (0 once it has gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


# The child: `diffseg data` in-process, timed, then its own peak RSS and its children's (the
# process pool's workers) from getrusage, as one JSON line on stdout.
CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from diffseg.cli import build_parser, main
build_parser()  # imports every stage (JAX among them), as `diffseg` does before any work
def cpu():
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)))
t1, c1 = time.perf_counter(), cpu()
rc = main(sys.argv[1:])
t2, c2 = time.perf_counter(), cpu()
own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"rc": rc, "import_s": t1 - t0, "main_s": t2 - t1, "self_kib": own.ru_maxrss,
                  "children_kib": kids.ru_maxrss, "cpu_s": c2, "main_cpu_s": c2 - c1}))
"""


def run_stage(config: Path, workers: int, pool: str) -> dict[str, Any]:
    """Run ``diffseg data --threads workers --pool pool`` in a fresh child process and measure it.

    Returns ``seconds`` (wall, interpreter start included), ``main_s`` (the command itself, after
    its imports), ``cpu_s`` (user + system, workers included), ``main_cpu_s`` (the command's
    share of it), ``cores_used`` (``main_cpu_s / main_s``: below the workers' count, the machine
    was shared or the workers waited on each other), ``peak_rss_mb`` (the child's own
    peak), ``worker_peak_rss_mb`` (the largest worker's, process pool only) and
    ``tree_peak_rss_mb`` (the sum over the child and its workers, sampled every 50 ms).
    """
    cmd = [sys.executable, "-c", CHILD, "data", "--config", str(config), "--dataset", "bench",
           "--threads", str(workers), "--pool", pool]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's diffseg
    peak = [0]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while child.poll() is None:
            peak[0] = max(peak[0], tree_rss(child.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"diffseg data failed ({child.returncode}):\n{err[-3000:]}")
    m = json.loads(out.strip().splitlines()[-1])
    return {
        "seconds": round(seconds, 2),
        "main_s": round(m["main_s"], 2),
        "import_s": round(m["import_s"], 2),
        "cpu_s": round(m["cpu_s"], 2),
        # CPU the command got per second of it: under 1 with one worker, the machine was shared.
        "main_cpu_s": round(m["main_cpu_s"], 2),
        "cores_used": round(m["main_cpu_s"] / m["main_s"], 2),
        "peak_rss_mb": round(m["self_kib"] / 1024, 1),
        "worker_peak_rss_mb": round(m["children_kib"] / 1024, 1) if pool == "process" else None,
        "tree_peak_rss_mb": round(peak[0] / 2**20, 1),
    }


def machine() -> dict[str, Any]:
    """CPU model, core count, load average and library versions of this run."""
    model = cpu_model()
    versions = {}
    for pkg in ("numpy", "SimpleITK", "nibabel"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pool", nargs="+", default=["thread"], choices=("thread", "process"))
    p.add_argument("--size", type=int, nargs=3, default=[256, 256, 100], help="raw voxels (X Y Z)")
    p.add_argument("--raw-spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], help="raw mm")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5], help="target mm")
    # 205 × 205 × 250 mm at 1.5 mm is 137 × 137 × 167 voxels: the crop keeps the whole body.
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 176], help="target voxels")
    p.add_argument("--classes", type=int, default=117, help="foreground classes (at most 255)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over every point (median reported)")
    p.add_argument("--keep", type=Path, help="keep (and reuse) the raw set in this folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_stage_cpu.json")
    args = p.parse_args(argv)
    if not 1 <= args.classes <= 255:
        p.error("--classes must be 1..255 (uint8 labels)")
    from diffseg.io import atomic_write_json

    work = Path(tempfile.mkdtemp(prefix="diffseg-data-bench-"))
    raw = args.keep or work / "raw"
    try:
        t0 = time.perf_counter()
        uids = write_raw(raw, max(args.cases), tuple(args.size), tuple(args.raw_spacing), args.classes)
        print(f"raw set: {len(uids)} cases in {raw} ({time.perf_counter() - t0:.1f} s)", flush=True)
        rows, summary = [], []
        for n in sorted(args.cases):
            task = write_task(work / f"task{n}", raw, uids[:n], args.classes)
            fingerprints = set()
            # One worker needs no pool (the same run whatever --pool says).
            points = [(w, pool) for w in args.workers for pool in (["none"] if w == 1 else args.pool)]
            runs: dict[tuple[int, str], list[dict[str, Any]]] = {pt: [] for pt in points}
            # Rounds of every point in turn: a load that comes and goes on a shared machine falls
            # on each point alike, and the median per point drops an outlier.
            for r in range(args.repeats):
                for w, pool in points:
                    results = work / f"results_{n}_{pool}_{w}"
                    cfg = write_config(work / f"config_{n}_{pool}_{w}.yaml", task, results, n, args)
                    load = os.getloadavg()[0]
                    m = run_stage(cfg, w, "thread" if pool == "none" else pool)
                    info = json.loads((results / "data/bench/dataset.json").read_text())
                    fingerprints.add(info["fingerprint"])
                    row = {"cases": n, "workers": w, "pool": pool, "round": r, **m,
                           "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                           "fingerprint": info["fingerprint"]}  # fmt: skip
                    runs[w, pool].append(row)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(results)
            if len(fingerprints) != 1:
                raise SystemExit(f"{n} cases: the runs' fingerprints differ: {sorted(fingerprints)}")
            serial = statistics.median(r["main_s"] for r in runs[points[0]])
            for (w, pool), rs in runs.items():
                main_s = statistics.median(r["main_s"] for r in rs)
                summary.append({
                    "cases": n, "workers": w, "pool": pool,
                    "seconds": round(statistics.median(r["seconds"] for r in rs), 2),
                    "main_s": round(main_s, 2),
                    "cases_per_s": round(n / main_s, 3),
                    "speedup": round(serial / main_s, 2) if points[0][0] == 1 else None,
                    "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 2),
                    "main_cpu_s": round(statistics.median(r["main_cpu_s"] for r in rs), 2),
                    "cores_used": round(statistics.median(r["cores_used"] for r in rs), 2),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "worker_peak_rss_mb": max((r["worker_peak_rss_mb"] or 0) for r in rs) or None,
                    "tree_peak_rss_mb": max(r["tree_peak_rss_mb"] for r in rs),
                })  # fmt: skip
        given = argv if argv is not None else sys.argv[1:]
        result = {
            "benchmark": "data_stage",
            "command": " ".join(["python benchmarks/data_stage.py", *given]),
            "raw": {
                "size": args.size,
                "spacing": args.raw_spacing,
                "dtype": "int16",
                "classes": args.classes,
            },  # fmt: skip
            "target": {"spacing": args.spacing, "shape": args.shape},
            "machine": machine(),
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "repeats": args.repeats,
            "summary": summary,  # per point: medians over the rounds, peaks over them
            "runs": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
