"""The GPU advice of docs/ACCELERATORS.md, from the GPU plans of the paper's steps
(``diffseg plan --target ... --json``).

Each plan lists every micro-batch with and without rematerialisation, compiled by XLA's GPU
compiler for one card (``tried``: bytes per device). A card's cell is the choice that
``micro_batch: auto`` and ``remat: auto`` make under its budget (``diffseg.accelerators.memory``: the card ×
JAX's allocator share × (1 − headroom)): remat off if any micro-batch fits without it, the
largest that fits. Only a card's own plan is used: XLA plans the same step differently for
different compute capabilities (an A100's plan is ~40 % above an H100's), so a plan is never
scaled to another card. The one exception, said in its row: the H200 (compute capability 9.0, as
the H100) takes the H100's plan under its own budget.

    python benchmarks/gpu_advice.py   # prints the table between DOC's gpu-advice markers

tests/test_docs.py checks that DOC's table (docs/ACCELERATORS.md) is this script's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
        fits = [t for t in rows if t["total_bytes"] <= budget]
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


if __name__ == "__main__":
    print(advice_table(), end="")
