"""The GPU and TPU advice of docs/ACCELERATORS.md, from the stored plans of the paper's steps
(``diffseg plan --target ... --json``).

Each plan lists every micro-batch with and without rematerialisation, compiled by XLA's GPU
compiler for one card (``tried``: bytes per device). A card's cell is the choice that
``micro_batch: auto`` and ``remat: auto`` make under its budget (``diffseg.accelerators.memory``: the card ×
JAX's allocator share × (1 − headroom)): remat off if any micro-batch fits without it, the
largest that fits. Only a card's own plan is used: XLA plans the same step differently for
different compute capabilities (an A100's plan is ~40 % above an H100's), so a plan is never
scaled to another card. The one exception, said in its row: the H200 (compute capability 9.0, as
the H100) takes the H100's plan under its own budget.

TPU slices likewise, from libtpu's plans (``plan_tpu_{step}_{slice}.json``), under the TPU budget
(the HBM a program may use on a device, as libtpu says it, less the TPU's headroom: JAX does not
preallocate a TPU; the same budget for every plan of a slice), with the compiler's own
estimate of a step's time and the training hours it implies (an estimate, not a measurement).

    python benchmarks/accelerator_advice.py        # the table between DOC's gpu-advice markers
    python benchmarks/accelerator_advice.py --tpu  # the table between DOC's tpu-advice markers

tests/test_docs.py checks that DOC's tables (docs/ACCELERATORS.md) are this script's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffseg.accelerators.targets import KNOWN_TPUS
from diffseg.train.plan import card_budget

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "ACCELERATORS.md"  # its table sits between DOC's markers
STEPS = {  # column title: the step's dataset and run
    "prostate 3D": "prostate_mr_3d-diff",
    "AMOS 3D": "abdominal_ct_3d-diff",
    "prostate 2D": "prostate_mr_2d-diff",
}
CARDS = [  # row title, the plan's card (benchmarks/results/plan_gpu_{step}_{card}.json), its GiB
    ("H200 141 GB (the H100's plan)", "h100-80gb", 141),
    ("H100 80 GB", "h100-80gb", 80),
    ("A100 80 GB", "a100-80gb", 80),
    ("RTX A6000 48 GB", "a6000", 48),
    ("A100 40 GB", "a100-40gb", 40),
    ("RTX 4090 24 GB (a spec file)", "rtx4090-24gb", 24),
    ("V100 16 GB (no bf16)", "v100-16gb", 16),
]


def choice(tried: list[dict[str, Any]], budget: int) -> str:
    """``auto``'s choice under ``budget`` bytes per device among a plan's ``tried`` rows."""
    for remat in (False, True):
        rows = sorted((t for t in tried if t["remat"] == remat), key=lambda t: -t["micro_batch"])
        fits = [t for t in rows if t.get("compiled", True) and t["total_bytes"] <= budget]
        if fits:
            m, passes = fits[0]["micro_batch"], rows[0]["micro_batch"] // fits[0]["micro_batch"]
            text = f"1 pass of {m}" if passes == 1 else f"{passes} passes of {m}"
            return f"{text} ({fits[0]['total_bytes'] / 2**30:.1f} GiB" + (", remat)" if remat else ")")
    return "does not fit"


def advice_table(results: Path = RESULTS) -> str:
    """The markdown table: one row per card, one column per paper step ("—": not planned)."""
    lines = ["| card | budget per device | " + " | ".join(STEPS) + " |", "|---|---|" + "---|" * len(STEPS)]
    for name, card, gib in CARDS:
        budget = card_budget(gib * 2**30)
        cells = []
        for step in STEPS.values():
            path = results / f"plan_gpu_{step}_{card}.json"
            cells.append(choice(json.loads(path.read_text())["tried"], budget) if path.is_file() else "—")
        lines.append(f"| {name} | {budget / 2**30:.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TPU_STEPS = {"prostate 3D": "prostate_mr_3d-diff", "AMOS 3D": "abdominal_ct_3d-diff",
             "prostate 2D": "prostate_mr_2d-diff"}  # fmt: skip


def _estimate(plan: dict[str, Any]) -> str:
    """The compiler's step time and training hours of the chosen step, where it gave them."""
    seconds = plan["xla"].get("estimate_s")
    if not seconds:
        return "—"
    return f"{seconds:.2f} s, {plan['estimate_hours']:.1f} h"


def tpu_advice_table(results: Path = RESULTS) -> str:
    """The markdown table: one row per TPU slice with a stored plan, a column per paper step (the
    choice, per device), and the compiler's estimate for the prostate 3D step."""
    head = (
        "| slice | devices | budget per device | "
        + " | ".join(TPU_STEPS)
        + " | prostate 3D, estimated step and 12 500 steps |"
    )
    lines = [head, "|---|---|---|" + "---|" * len(TPU_STEPS) + "---|"]
    for name, target in KNOWN_TPUS.items():
        plans = {col: results / f"plan_tpu_{step}_{name}.json" for col, step in TPU_STEPS.items()}
        if not any(p.is_file() for p in plans.values()):
            continue
        stored = {col: json.loads(p.read_text()) for col, p in plans.items() if p.is_file()}
        budget = next(iter(stored.values()))["budget_bytes"]  # libtpu's usable HBM × (1 − headroom)
        cells = [choice(stored[col]["tried"], budget) if col in stored else "—" for col in plans]
        main = plans["prostate 3D"]
        estimate = _estimate(json.loads(main.read_text())) if main.is_file() else "—"
        lines.append(f"| {target.description} | {target.devices} | {budget / 2**30:.1f} GiB | "
                     + " | ".join(cells) + f" | {estimate} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(tpu_advice_table() if "--tpu" in sys.argv[1:] else advice_table(), end="")
