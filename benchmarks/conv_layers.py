"""One 3×3×3 convolution, forward + backward, per implementation and per U-Net level.

Times ``diffseg.model.conv.conv_nd`` with each ``impl`` ("xla", "fold", "tiled", "onednn") and
PyTorch's ``Conv3d`` (channels_last_3d, if torch is installed) on the four level shapes of the
benchmark U-Net (64×64×16 input, batch 2, channels 32–256), bias included, median of
``--repeats`` after one warm-up; each impl in the layout the U-Net gives it:

    python benchmarks/conv_layers.py

"tiled" is forced on every level here (``TILED_MIN_PLANE = 0``), so the table shows where the
U-Net's "auto" switches to "fold". Writes ``benchmarks/results/conv_layers_{backend}.json``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import median_seconds

from diffseg.io import atomic_write_json
from diffseg.model import conv as conv_module
from diffseg.model.conv import conv_nd

# (Z, X, Y, Cin, Cout) of the level-0..3 convolutions, plus the stem (10 input channels).
LEVELS = [
    (16, 64, 64, 32, 32),
    (8, 32, 32, 64, 64),
    (4, 16, 16, 128, 128),
    (2, 8, 8, 256, 256),
    (16, 64, 64, 10, 32),
]


def time_jax(impl: str, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    """Seconds for forward + all three gradients of one conv, in the layout the U-Net uses."""
    z, sx, sy, cin, cout = shape
    layout = "xyz" if impl in ("xla", "onednn") else "zxy"
    spatial = (sx, sy, z) if layout == "xyz" else (z, sx, sy)
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, *spatial, cin))
    kernel = jax.random.normal(kk, (3, 3, 3, cin, cout)) * 0.05
    bias = jnp.zeros(cout)
    cot = jax.random.normal(kc, (batch, *spatial, cout))

    def loss(x, k, b):
        return jnp.sum(conv_nd(x, k, b, impl=impl, layout=layout) * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return median_seconds(lambda: jax.block_until_ready(grad(x, kernel, bias)), repeats)[0]


def time_torch(shape: tuple[int, ...], batch: int, repeats: int) -> float:
    """The same for ``torch.nn.Conv3d`` in channels_last_3d (input gradient included)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    z, sx, sy, cin, cout = shape
    conv = torch.nn.Conv3d(cin, cout, 3, padding=1).to(memory_format=torch.channels_last_3d)
    x = torch.randn(batch, cin, z, sx, sy).to(memory_format=torch.channels_last_3d).requires_grad_()
    cot = torch.randn(batch, cout, z, sx, sy).to(memory_format=torch.channels_last_3d)

    def step():
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).backward(cot)

    return median_seconds(step, repeats)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default by backend)")
    args = ap.parse_args(argv)
    conv_module.TILED_MIN_PLANE = 0
    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
    rows = []
    print("(Z, X, Y, Cin, Cout)        xla ms  fold ms tiled ms onednn ms torch ms", flush=True)
    for shape in LEVELS:
        row = {"shape": list(shape)}
        for impl in ("xla", "fold", "tiled", "onednn"):
            row[impl] = time_jax(impl, shape, args.batch, args.repeats)
        row["torch_channels_last"] = time_torch(shape, args.batch, args.repeats) if has_torch else None
        rows.append(row)
        ms = [row[k] * 1e3 if row[k] is not None else float("nan") for k in list(row)[1:]]
        print(f"{shape!s:26s} " + " ".join(f"{v:8.0f}" for v in ms), flush=True)
    out = args.out or Path(__file__).parent / "results" / f"conv_layers_{jax.default_backend()}.json"
    atomic_write_json(out, {"backend": jax.default_backend(), "batch": args.batch, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
