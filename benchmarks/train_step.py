"""Train-step speed of the diffseg U-Net: JAX (fast conv, plain XLA conv) vs the same net in PyTorch.

One step = forward, cross-entropy + foreground Dice loss, backward, AdamW update (jitted in JAX,
eager in PyTorch), timed after warm-up as the median of ``--repeats`` runs. The JAX and PyTorch
timings are interleaved round by round so that load from other processes hits both alike.

    python benchmarks/train_step.py                      # 3D, 64×64×16, batch 2, channels 32–256
    python benchmarks/train_step.py --skip-xla --repeats 5
    python benchmarks/train_step.py --default-malloc      # glibc's malloc as it comes

Like the ``diffseg`` CLI, it first calls ``diffseg.host_memory.reuse_freed_memory()``; JAX and
PyTorch share the process, so both run with the same allocator settings.

Writes ``benchmarks/results/train_step_{backend}.json``; the LAST printed line is the speed ratio
``torch_seconds / jax_seconds`` (≥ 1 means JAX is faster). Needs the ``benchmark`` extra (torch).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import seconds

from diffseg.host_memory import reuse_freed_memory
from diffseg.io import atomic_write_json
from diffseg.model import UNet
from diffseg.model.conv import resolve_impl
from diffseg.model.unet import num_groups
from diffseg.train.losses import cross_entropy, dice_loss

LR = 1e-4


def _has_avx512() -> bool | None:
    """Whether the CPU has AVX-512 (oneDNN and XLA pick other kernels with it); None if unknown."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


# ----------------------------------------------------------------------------------------- JAX
def jax_loss(logits: jax.Array, onehot: jax.Array) -> jax.Array:
    """Training's loss: cross-entropy + foreground Dice (``diffseg.train.losses``). → scalar."""
    return cross_entropy(logits, onehot) + dice_loss(logits, onehot)


def make_jax_step(model: UNet, batch: dict[str, jax.Array]):
    """Return (state, jitted step(state, batch) -> (state, loss))."""
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["image"], batch["mask"], batch["t"])
    tx = optax.adamw(LR)
    return (params, tx.init(params)), jax_step(model, tx)


def jax_step(model: UNet, tx: optax.GradientTransformation):
    """The jitted step(state, batch) -> (state, loss); every ``conv_impl`` takes the same state."""

    @jax.jit
    def step(state, batch):
        params, opt = state

        def loss_fn(p):
            logits = model.apply(p, batch["image"], batch["mask"], batch["t"])
            return jax_loss(logits, batch["onehot"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    return step


# ------------------------------------------------------------------------------------- PyTorch
def build_torch(num_classes: int, channels: list[int], dims: int, time_dim: int, in_ch: int):
    """The same U-Net as ``diffseg.model.UNet`` (conditional), in PyTorch, channels-first."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    ConvNd = nn.Conv3d if dims == 3 else nn.Conv2d

    class ResBlock(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.conv1 = ConvNd(cin, cout, 3, padding=1)
            self.norm1 = nn.GroupNorm(num_groups(cout), cout, eps=1e-6)
            self.time = nn.Linear(time_dim, 2 * cout)
            self.conv2 = ConvNd(cout, cout, 3, padding=1)
            self.norm2 = nn.GroupNorm(num_groups(cout), cout, eps=1e-6)
            self.skip = ConvNd(cin, cout, 1) if cin != cout else None

        def forward(self, x, temb):
            h = self.norm1(self.conv1(x))
            scale, shift = self.time(F.silu(temb)).chunk(2, dim=1)
            view = (h.shape[0], -1) + (1,) * dims
            h = F.silu(h * (1 + scale.view(view)) + shift.view(view))
            h = F.silu(self.norm2(self.conv2(h)))
            return h + (self.skip(x) if self.skip is not None else x)

    class TorchUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.time_mlp1 = nn.Linear(time_dim, 4 * time_dim)
            self.time_mlp2 = nn.Linear(4 * time_dim, time_dim)
            self.stem = ConvNd(in_ch, channels[0], 3, padding=1)
            self.down = nn.ModuleList(
                ResBlock(channels[max(i - 1, 0)] if i else channels[0], c) for i, c in enumerate(channels)
            )
            self.up = nn.ModuleList(
                ResBlock(channels[i + 1] + channels[i], channels[i]) for i in range(len(channels) - 1)
            )
            self.head = ConvNd(channels[0], num_classes, 1)
            self.pool = F.avg_pool3d if dims == 3 else F.avg_pool2d

        def forward(self, x, t):
            half = time_dim // 2
            freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            args = t.float()[:, None] * freqs[None].to(t.device)
            temb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
            temb = self.time_mlp2(F.silu(self.time_mlp1(temb)))
            h = self.stem(x)
            skips = []
            for i, block in enumerate(self.down):
                if i:
                    h = self.pool(h, 2)
                h = block(h, temb)
                skips.append(h)
            for i in range(len(channels) - 2, -1, -1):
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                h = self.up[i](torch.cat([h, skips[i]], dim=1), temb)
            return self.head(h)

    return TorchUNet()


def torch_loss(logits, onehot):
    """``jax_loss`` in PyTorch; logits/onehot ``(B, C, *S)``.

    Mirrors ``diffseg.train.losses``: foreground Dice averaged over the classes present in
    each sample's label (eps 1e-6), plus the mean voxel-wise cross-entropy.
    """
    import torch

    logp = torch.log_softmax(logits, dim=1)
    ce = -(onehot * logp).sum(1).mean()
    prob = logp.exp()[:, 1:]
    target = onehot[:, 1:]
    axes = tuple(range(2, logits.ndim))
    inter = (prob * target).sum(axes)
    dice = 2 * inter / (prob.sum(axes) + target.sum(axes) + 1e-6)
    present = (target.sum(axes) > 0).float()
    per_sample = ((1 - dice) * present).sum(1) / present.sum(1).clamp(min=1.0)
    return ce + per_sample.mean()


# ---------------------------------------------------------------------------------------- main
def xla_flops(step, state, batch) -> float:
    """XLA's count of a compiled step's floating-point operations.

    Call it on a step with ``conv_impl="xla"`` (the same math): the cost analysis counts a
    while-loop body once, so it under-counts the "tiled" convolution's loop over chunks.
    """
    cost = step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[64, 64, 16], help="spatial shape")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--classes", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--impl", default="auto", help="conv_impl of the fast JAX model")
    ap.add_argument("--skip-xla", action="store_true", help="skip the (slow on CPU) plain-XLA model")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument(
        "--torch-channels-last",
        action="store_true",
        help="also time PyTorch with channels_last(_3d) memory format (best torch is the peer)",
    )
    ap.add_argument("--bf16", action="store_true", help="bfloat16 compute for the JAX models")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default by backend)")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc instead of diffseg's reuse_freed_memory() (both frameworks)",
    )
    args = ap.parse_args(argv)
    # As the diffseg CLI does for training; one process, so PyTorch gets the same allocator.
    reuse = False if args.default_malloc else reuse_freed_memory()
    print(f"malloc: {'reuse freed memory' if reuse else 'glibc default'}", flush=True)

    dims = len(args.shape)
    backend = jax.default_backend()
    device = str(jax.devices()[0].device_kind)
    c, b, spatial = args.classes, args.batch, tuple(args.shape)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, c, size=(b, *spatial))
    onehot = np.eye(c, dtype=np.float32)[labels]
    image = rng.standard_normal((b, *spatial, 1)).astype(np.float32)
    mask = (2 * onehot - 1 + 0.5 * rng.standard_normal(onehot.shape)).astype(np.float32)
    t = np.array([251, 750][:b] + [500] * max(0, b - 2), dtype=np.int32)
    batch = {k: jnp.asarray(v) for k, v in dict(image=image, mask=mask, t=t, onehot=onehot).items()}

    runners: dict[str, Any] = {}
    counts: dict[str, int] = {}
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    impls = [("jax_fast", args.impl)] + ([] if args.skip_xla else [("jax_xla", "xla")])
    flops: float | None = None
    for name, impl in impls:
        model = UNet(
            num_classes=c, channels=tuple(args.channels), spatial_dims=dims, dtype=dtype, conv_impl=impl
        )
        state, step = make_jax_step(model, batch)
        counts["jax"] = sum(int(p.size) for p in jax.tree.leaves(state[0]))
        holder = {"state": state}

        def run(step=step, holder=holder):
            holder["state"], loss = step(holder["state"], batch)
            jax.block_until_ready(loss)

        print(f"{name} ({impl}): compile + first step {seconds(run):.1f} s", flush=True)
        runners[name] = run
        if resolve_impl(impl, dims) == "xla" and flops is None:  # already compiled: no extra cost
            flops = xla_flops(step, state, batch)
    if flops is None:  # compile (never run) the plain-XLA twin on the same state
        twin = UNet(
            num_classes=c, channels=tuple(args.channels), spatial_dims=dims, dtype=dtype, conv_impl="xla"
        )
        flops = xla_flops(jax_step(twin, optax.adamw(LR)), state, batch)

    torch_device = None
    if not args.skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        tnet = build_torch(c, args.channels, dims, 128, 1 + c).to(torch_device)
        counts["torch"] = sum(p.numel() for p in tnet.parameters())
        topt = torch.optim.AdamW(tnet.parameters(), lr=LR)
        perm = (0, dims + 1, *range(1, dims + 1))
        tx = torch.from_numpy(np.concatenate([image, mask], -1).transpose(perm).copy()).to(torch_device)
        toh = torch.from_numpy(onehot.transpose(perm).copy()).to(torch_device)
        tt = torch.from_numpy(t).to(torch_device)

        def run_torch():
            topt.zero_grad(set_to_none=True)
            loss = torch_loss(tnet(tx, tt), toh)
            loss.backward()
            topt.step()
            if torch_device == "cuda":
                torch.cuda.synchronize()

        runners["torch"] = run_torch
        if args.torch_channels_last:
            fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
            tnet_cl = build_torch(c, args.channels, dims, 128, 1 + c).to(torch_device, memory_format=fmt)
            topt_cl = torch.optim.AdamW(tnet_cl.parameters(), lr=LR)
            tx_cl, toh_cl = tx.contiguous(memory_format=fmt), toh.contiguous(memory_format=fmt)

            def run_torch_cl():
                topt_cl.zero_grad(set_to_none=True)
                torch_loss(tnet_cl(tx_cl, tt), toh_cl).backward()
                topt_cl.step()
                if torch_device == "cuda":
                    torch.cuda.synchronize()

            runners["torch_cl"] = run_torch_cl

    print(f"parameters: {counts}", flush=True)
    if "torch" in counts and counts["torch"] != counts["jax"]:
        print("WARNING: parameter counts differ", file=sys.stderr)
    for run in runners.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):  # interleaved rounds: shared-CPU noise hits every model alike
        for name, run in runners.items():
            times[name].append(seconds(run))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:9s} {v:.3f} s/step  (all: {', '.join(f'{x:.3f}' for x in times[k])})", flush=True)

    torch_names = [k for k in ("torch", "torch_cl") if k in med]
    best_torch = min((med[k] for k in torch_names), default=float("nan"))
    ratio = best_torch / med["jax_fast"]
    result = {
        "backend": backend,
        "device": device,
        "cpu_count": os.cpu_count(),
        "cpu_avx512": _has_avx512(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": __import__("jaxlib").__version__,
            "flax": __import__("flax").__version__,
            "torch": __import__("torch").__version__ if not args.skip_torch else None,
        },
        "torch_device": torch_device,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc_reuse_freed_memory": reuse,
        "config": {
            "shape": list(spatial),
            "batch": b,
            "channels": args.channels,
            "classes": c,
            "dims": dims,
            "repeats": args.repeats,
            "impl": args.impl,
            "bf16": args.bf16,
        },
        "parameters": counts,
        "seconds_per_step": med,
        "all_seconds": times,
        "ratio_torch_over_jax_fast": ratio,  # best PyTorch variant timed / JAX fast
        "jax_fast_flops_per_step": flops,
        "jax_fast_tflops_per_s": flops / med["jax_fast"] / 1e12,
        # peak device memory (accelerators report it; the CPU backend does not)
        "jax_peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
    }
    print(
        f"JAX fast: {flops / 1e9:.1f} GFLOP/step,"
        f" {result['jax_fast_tflops_per_s'] * 1e3:.1f} GFLOP/s achieved,"
        f" steps/s {1 / med['jax_fast']:.3f}, peak device memory {result['jax_peak_bytes']}",
        flush=True,
    )
    if "jax_xla" in med:
        result["ratio_torch_over_jax_xla"] = best_torch / med["jax_xla"]
        result["speedup_fast_over_xla"] = med["jax_xla"] / med["jax_fast"]
    out = args.out or Path(__file__).parent / "results" / f"train_step_{backend}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    print(f"JAX/PyTorch speed ratio (torch_time / jax_time, >=1 means JAX faster): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
