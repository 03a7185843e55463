"""Train-step speed of the diffseg U-Net: JAX (fast conv, plain XLA conv) vs the same net in PyTorch.

The network is the project's default, ``diffseg.model.ReferenceUNet`` (``--arch reference``, the
paper's reference implementation ImgX-DiffSeg v0.1.0), or the older ``diffseg.model.UNet``
(``--arch legacy``); the JAX side is built by ``diffseg.runs.build_model``/``init_params`` as
training builds it, the PyTorch side by ``build_torch`` (same layers, same parameter count:
checked before anything is timed).

One step = noise the ground-truth mask to a diffusion step (``--recycle``: the paper's recycling,
a first forward pass without gradient whose x0 prediction is noised instead), forward, training's
loss (cross-entropy + foreground Dice), backward, AdamW update; jitted in JAX, eager in PyTorch.
Timed after warm-up as the median of ``--repeats`` runs.

On a CPU the models are timed interleaved, round by round, so that load from other processes hits
all alike. On a GPU they run one after the other (PyTorch first, which can hand its memory back),
so that each has the device's memory to itself.

    python benchmarks/train_step.py                      # 3D, 64×64×16, batch 2, channels 32–256
    python benchmarks/train_step.py --arch legacy        # the older UNet (GroupNorm, SiLU, FiLM)
    python benchmarks/train_step.py --skip-xla --repeats 5
    python benchmarks/train_step.py --default-malloc      # glibc's malloc as it comes
    python benchmarks/train_step.py --shape 256 256 48 --batch 8 --bf16 --recycle   # the paper's step (GPU)

Like the ``diffseg`` CLI, it first calls ``diffseg.host_memory.reuse_freed_memory()``; JAX and
PyTorch share the process, so both run with the same allocator settings.

Writes ``benchmarks/results/train_step_{backend}_{arch}.json`` (``--out`` to choose); the LAST
printed line is the speed ratio ``torch_seconds / jax_seconds`` (≥ 1 means JAX is faster). Needs
the ``benchmark`` extra (torch) unless ``--skip-torch``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import seconds

from diffseg.diffusion import GaussianDiffusion, mask_to_x0
from diffseg.host_memory import reuse_freed_memory
from diffseg.io import atomic_write_json
from diffseg.model import UNet
from diffseg.model.conv import resolve_impl
from diffseg.model.unet import num_groups
from diffseg.runs import build_model, count_parameters, init_params
from diffseg.train.losses import cross_entropy, dice_loss
from diffseg.train.step import noisy_input

LR = 1e-4
ARCHS = ("reference", "legacy")
TIME_EMBED_DIM = UNet.time_embed_dim  # the legacy model's default; its PyTorch twin needs it too

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s: the FLOP-utilisation basis.
# Matched in order against ``device_kind``; ``--peak-tflops`` overrides.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def _has_avx512() -> bool | None:
    """Whether the CPU has AVX-512 (oneDNN and XLA pick other kernels with it); None if unknown."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def peak_tflops(device_kind: str, bf16: bool, given: float | None) -> float | None:
    """The device's peak TFLOP/s for the run's precision: ``given``, else the bf16 table, else None."""
    if given is not None:
        return given
    if not bf16:
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_kind), None)


@dataclass
class Batch:
    """One fixed training batch, numpy, channels-last.

    image ``(B, *S, 1)``; onehot ``(B, *S, C)``; x0 = 2·onehot − 1; k ``(B,)`` diffusion positions.
    """

    image: np.ndarray
    onehot: np.ndarray
    x0: np.ndarray
    k: np.ndarray

    @classmethod
    def random(cls, batch: int, spatial: tuple[int, ...], classes: int, num_steps: int) -> Batch:
        rng = np.random.default_rng(0)
        x0 = np.asarray(mask_to_x0(rng.integers(0, classes, size=(batch, *spatial)), classes))
        image = rng.standard_normal((batch, *spatial, 1)).astype(np.float32)
        k = (np.arange(batch) % num_steps).astype(np.int32)
        return cls(image=image, onehot=(x0 + 1.0) / 2.0, x0=x0, k=k)


@dataclass
class Runner:
    """A model ready to time: ``run()`` does one step and blocks until it is done."""

    run: Callable[[], None]
    parameters: int
    peak_bytes: Callable[[], int | None] = lambda: None
    close: Callable[[], None] = lambda: None


# ----------------------------------------------------------------------------------------- JAX
def jax_network(arch: str, num_classes: int, channels: list[int], dims: int, bf16: bool, impl: str):
    """The conditional (diffusion) network as training builds it: ``diffseg.runs.build_model``.

    ``arch`` "reference" (``ReferenceUNet``, the reference's time placement) or "legacy" (``UNet``).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    run_cfg = {
        "model": {
            "arch": arch,
            "channels": list(channels),
            "spatial_dims": dims,
            "time_embed_dim": TIME_EMBED_DIM,
        },
        "diffusion": {"enabled": True},
        "train": {"bf16": bf16},
    }
    return build_model(run_cfg, num_classes, conv_impl=impl)


def jax_loss(logits: jax.Array, onehot: jax.Array) -> jax.Array:
    """Training's loss: cross-entropy + foreground Dice (``diffseg.train.losses``). → scalar."""
    return cross_entropy(logits, onehot) + dice_loss(logits, onehot)


def jax_step(model: Any, tx: optax.GradientTransformation, diffusion: GaussianDiffusion, recycle: bool):
    """The jitted ``step(state, batch) -> (state, loss)``; every ``conv_impl`` takes the same state.

    The noisy input comes from training's own ``diffseg.train.step.noisy_input`` (x0 prediction).
    """

    @jax.jit
    def step(state, batch):
        params, opt = state

        def loss_fn(p):
            image, x0, k = batch["image"], batch["x0"], batch["k"]
            x_t, _ = noisy_input(model.apply, p, diffusion, image, x0, k, batch["key"], "x0", recycle)
            logits = model.apply(p, image, x_t, diffusion.t(k)).astype(jnp.float32)
            return jax_loss(logits, batch["onehot"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    return step


def jax_model(
    model: Any,
    diffusion: GaussianDiffusion,
    recycle: bool,
    batch: dict[str, jax.Array],
    abstract: bool = False,
):
    """The jitted step and its first state ``(params, opt_state)``.

    ``abstract``: the state's shapes only (``jax.eval_shape``: nothing computed or allocated).
    """
    tx = optax.adamw(LR)

    def init():
        params = init_params(model, batch["image"].shape[1:-1], jax.random.PRNGKey(0))
        return params, tx.init(params)

    state = jax.eval_shape(init) if abstract else jax.jit(init)()
    return jax_step(model, tx, diffusion, recycle), state


def jax_inputs(data: Batch) -> dict[str, jax.Array]:
    """The batch as device arrays, with the PRNG key of the step's noise."""
    arrays = {k: jnp.asarray(v) for k, v in vars(data).items()}
    return arrays | {"key": jax.random.key(1)}


def jax_runner(step, state, batch: dict[str, jax.Array]) -> Runner:
    """Time ``step`` from ``state`` (from ``jax_model``); the Runner updates the state in place."""
    holder = {"state": state}

    def run() -> None:
        holder["state"], loss = step(holder["state"], batch)
        jax.block_until_ready(loss)

    def peak() -> int | None:  # the process's peak so far: accelerators report it, the CPU does not
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

    return Runner(run, sum(int(p.size) for p in jax.tree.leaves(state[0])), peak)


def xla_cost(step, state, batch: dict[str, jax.Array]) -> dict[str, Any]:
    """XLA's FLOP count and memory plan of the jitted ``step`` for ``(state, batch)``.

    Compiles, never runs; arrays or shapes alike. A step already compiled for these shapes (the
    timed plain-XLA model) comes from JAX's cache at no cost. Use ``conv_impl="xla"`` (the same
    math as every other): the cost analysis counts a while-loop body once, so it under-counts
    ``tiled``'s loop over chunks, and it cannot see inside the oneDNN custom calls.
    Returns {"flops", "temp_bytes", "argument_bytes", "output_bytes"}.
    """
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (state, batch))
    compiled = step.lower(*spec).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    sizes = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    return {"flops": float((cost or {}).get("flops", float("nan")))} | {
        name.replace("_size_in", ""): getattr(memory, name, None) for name in sizes
    }


# ------------------------------------------------------------------------------------- PyTorch
def torch_time_embedding(t, dim: int):
    """``diffseg.model.unet.sinusoidal_embedding`` in PyTorch: t ``(B,)`` → ``(B, dim)``, cos half first."""
    import torch

    half = dim // 2
    freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def build_torch(arch: str, num_classes: int, channels: list[int], dims: int, in_ch: int):
    """The PyTorch twin of ``jax_network(arch, …)`` (conditional), channels-first; see the two below."""
    if arch == "reference":
        return build_torch_reference(num_classes, channels, dims, in_ch)
    if arch == "legacy":
        return build_torch_legacy(num_classes, channels, dims, TIME_EMBED_DIM, in_ch)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def build_torch_reference(num_classes: int, channels: list[int], dims: int, in_ch: int):
    """``diffseg.model.ReferenceUNet`` (conditional, ``time_conditioning="reference"``) in PyTorch.

    The same modules under the same names as the Flax tree (``stem``, ``enc0``, ``down1``, ``enc1``,
    …, ``up0``, ``dec0``, ``head``), so ``load_jax_params`` can copy a Flax tree in: convolutions
    without bias, InstanceNorm with affine (eps 1e-5), GELU with the tanh approximation,
    kernel-2 stride-2 ``Conv`` (no bias) + InstanceNorm down, kernel-2 stride-2 ``ConvTranspose``
    (with bias) up plus the skip, a 1^d head with bias; the sinusoidal time embedding of width
    ``4·channels[0]``, through GELU once, and one ``Linear`` per residual block added before its
    second InstanceNorm. Channels-first ``(B, C, *S)``; 2D (``dims=2``) takes slices ``(B, C, X, Y)``.
    """
    from torch import nn
    from torch.nn import functional as F

    ConvNd = nn.Conv3d if dims == 3 else nn.Conv2d
    ConvTNd = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
    NormNd = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
    c0 = channels[0]
    time_dim = 4 * c0

    def gelu(x):
        return F.gelu(x, approximate="tanh")

    def norm(ch: int):
        return NormNd(ch, eps=1e-5, affine=True)

    class ConvNormAct(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.conv, self.norm = ConvNd(cin, cout, 3, padding=1, bias=False), norm(cout)

        def forward(self, x):
            return gelu(self.norm(self.conv(x)))

    class ResBlock(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.conv1, self.norm1 = ConvNd(ch, ch, 3, padding=1, bias=False), norm(ch)
            self.conv2, self.norm2 = ConvNd(ch, ch, 3, padding=1, bias=False), norm(ch)
            self.time = nn.Linear(time_dim, ch)

        def forward(self, x, temb):
            h = self.conv2(gelu(self.norm1(self.conv1(x))))
            h = h + self.time(temb).view(h.shape[0], -1, *(1,) * dims)  # cancelled by norm2, as in JAX
            return gelu(self.norm2(h) + x)

    class Down(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.conv, self.norm = ConvNd(cin, cout, 2, stride=2, bias=False), norm(cout)

        def forward(self, x):
            return self.norm(self.conv(x))

    class TorchReferenceUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.levels = len(channels)
            self.stem, self.enc0 = ConvNormAct(in_ch, c0), ResBlock(c0)
            for level, (cin, ch) in enumerate(zip([c0, *channels[:-1]], channels, strict=True), start=1):
                self.add_module(f"down{level}", Down(cin, ch))
                self.add_module(f"enc{level}", ResBlock(ch))
            widths = (c0, *channels[:-1])
            for level in range(self.levels - 1, -1, -1):
                cin = channels[-1] if level == self.levels - 1 else widths[level + 1]
                self.add_module(f"up{level}", ConvTNd(cin, widths[level], 2, stride=2))
                self.add_module(f"dec{level}", ResBlock(widths[level]))
            self.head = ConvNd(c0, num_classes, 1)

        def forward(self, x, t):
            temb = gelu(torch_time_embedding(t, time_dim))
            h = self.enc0(self.stem(x), temb)
            skips = [h]
            for level in range(1, self.levels + 1):
                h = getattr(self, f"enc{level}")(getattr(self, f"down{level}")(h), temb)
                skips.append(h)
            for level in range(self.levels - 1, -1, -1):
                h = getattr(self, f"up{level}")(h) + skips[level]
                h = getattr(self, f"dec{level}")(h, temb)
            return self.head(h)

    return TorchReferenceUNet()


def load_jax_params(net, params: Any) -> None:
    """Copy a Flax ``ReferenceUNet`` parameter tree into ``build_torch_reference``'s net, in place.

    Every leaf has a counterpart (same module path): conv kernels ``(*K, Cin, Cout)`` →
    ``(Cout, Cin, *K)``; transposed-conv kernels, which ``lax.conv_transpose`` applies flipped,
    → flipped ``(Cin, Cout, *K)``; Dense ``(E, C)`` → Linear ``(C, E)``; InstanceNorm scale/offset →
    weight/bias. Raises if any parameter of the net is left unset.
    """
    import torch
    from torch import nn

    leaves = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    done = set()
    for path, value in leaves:
        names = [p.key for p in path]
        module = net.get_submodule(".".join(names[:-1]))
        a = np.asarray(value, dtype=np.float32)
        leaf = names[-1]
        if leaf in ("scale", "offset", "bias"):
            target = "weight" if leaf == "scale" else "bias"
        elif isinstance(module, nn.Linear):
            target, a = "weight", a.T
        elif isinstance(module, nn.ConvTranspose2d | nn.ConvTranspose3d):
            d = a.ndim - 2
            target, a = "weight", np.flip(a, tuple(range(d))).transpose(d, d + 1, *range(d))
        else:
            d = a.ndim - 2
            target, a = "weight", a.transpose(d + 1, d, *range(d))
        param = getattr(module, target)
        if tuple(param.shape) != a.shape:
            raise ValueError(f"{'.'.join(names)}: {a.shape} does not fit torch's {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.array(a, dtype=np.float32)))
        done.add(f"{'.'.join(names[:-1])}.{target}")
    missing = {name for name, _ in net.named_parameters()} - done
    if missing:
        raise ValueError(f"parameters of the PyTorch net not in the Flax tree: {sorted(missing)}")


def build_torch_legacy(num_classes: int, channels: list[int], dims: int, time_dim: int, in_ch: int):
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
            temb = self.time_mlp2(F.silu(self.time_mlp1(torch_time_embedding(t, time_dim))))
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


def torch_runner(
    arch: str,
    data: Batch,
    channels: list[int],
    diffusion: GaussianDiffusion,
    recycle: bool,
    bf16: bool,
    device: str,
    channels_last: bool,
) -> Runner:
    """The PyTorch twin of ``jax_step`` (bf16: autocast, parameters float32 as in the JAX model).

    Noise is drawn every step, as in the JAX step (there from a fixed key, so the same values,
    at the same cost). The q-sample below is the same
    ``sqrt(abar_k) x0 + sqrt(1 - abar_k) noise`` as ``GaussianDiffusion.q_sample``, with its
    float64 coefficients.
    """
    import torch
    from torch.nn import functional as F

    dims = data.image.ndim - 2
    fmt = (torch.channels_last_3d if dims == 3 else torch.channels_last) if channels_last else None
    net = build_torch(arch, data.onehot.shape[-1], channels, dims, 1 + data.onehot.shape[-1])
    net = net.to(device, memory_format=fmt) if fmt else net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    perm = (0, dims + 1, *range(1, dims + 1))

    def tensor(a: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(a.transpose(perm))).to(device)
        return x.contiguous(memory_format=fmt) if fmt else x

    image, onehot, x0 = tensor(data.image), tensor(data.onehot), tensor(data.x0)
    view = (-1,) + (1,) * (dims + 1)
    k_next = np.minimum(data.k + 1, diffusion.num_steps - 1)

    def coefficients(k: np.ndarray):
        """(sqrt(abar_k), sqrt(1 - abar_k)) shaped to broadcast, and the time input t_k."""
        abar = diffusion.alphas_cumprod[k]
        a, b = (torch.tensor(v, dtype=torch.float32, device=device).view(view) for v in (abar, 1 - abar))
        return a.sqrt(), b.sqrt(), torch.from_numpy(diffusion.timesteps[k]).to(device)

    now, after = coefficients(data.k), coefficients(k_next)

    def net_input(x):
        return torch.cat([image, x], dim=1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            start = x0
            if recycle:  # paper eq. 8-9: noise one step further, predict x0 without gradient
                with torch.no_grad():
                    sa, sb, t = after
                    logits = net(net_input(sa * x0 + sb * torch.randn_like(x0)), t).float()
                    start = 2 * F.softmax(logits, dim=1) - 1
            sa, sb, t = now
            loss = torch_loss(net(net_input(sa * start + sb * torch.randn_like(x0)), t).float(), onehot)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def peak() -> int | None:
        return torch.cuda.max_memory_allocated() if device == "cuda" else None

    def close() -> None:
        nonlocal net, opt, image, onehot, x0
        del net, opt, image, onehot, x0
        if device == "cuda":
            torch.cuda.empty_cache()

    return Runner(step, sum(p.numel() for p in net.parameters()), peak, close)


# ---------------------------------------------------------------------------------------- main
def check_parameter_counts(
    arch: str, num_classes: int, channels: list[int], dims: int, shape: tuple[int, ...]
) -> int:
    """The JAX network's parameter count (shapes only, nothing computed), equal to its twin's.

    Raises ValueError when they differ. Returns the count.
    """
    model = jax_network(arch, num_classes, channels, dims, False, "xla")
    ours = count_parameters(jax.eval_shape(lambda: init_params(model, shape, jax.random.PRNGKey(0))))
    net = build_torch(arch, num_classes, channels, dims, 1 + num_classes)
    theirs = sum(p.numel() for p in net.parameters())
    if ours != theirs:
        raise ValueError(f"{arch}: the PyTorch twin has {theirs} parameters, the JAX network {ours}")
    return ours


def isa_settings(torch: Any | None) -> dict[str, Any]:
    """The instruction-set caps in force: the environment variables and what PyTorch dispatches to.

    ``ONEDNN_MAX_CPU_ISA`` caps oneDNN (diffseg's convolutions and PyTorch's), ``XLA_FLAGS``'s
    ``--xla_cpu_max_isa`` XLA's own code, ``ATEN_CPU_CAPABILITY`` PyTorch's ATen kernels.
    """
    names = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    out: dict[str, Any] = {name: os.environ.get(name) for name in names}
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability() if torch is not None else None
    return out


def time_runners(
    factories: dict[str, Callable[[], Runner]], warmup: int, repeats: int, interleave: bool
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, int | None]]:
    """Seconds per step of each model (``repeats`` each), its parameter count and peak device memory.

    ``interleave``: build every model first, then time them round by round (shared-CPU noise
    hits all alike); else build, time and close each in turn (each has the device to itself).
    """
    times: dict[str, list[float]] = {name: [] for name in factories}
    counts: dict[str, int] = {}
    peaks: dict[str, int | None] = {}
    groups = [list(factories)] if interleave else [[name] for name in factories]
    for group in groups:
        runners = {name: factories[name]() for name in group}
        for runner in runners.values():
            for _ in range(warmup):
                runner.run()
        for _ in range(repeats):
            for name, runner in runners.items():
                times[name].append(seconds(runner.run))
        for name, runner in runners.items():
            counts[name], peaks[name] = runner.parameters, runner.peak_bytes()
            runner.close()
    return times, counts, peaks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="reference", help="the network (default: reference)")
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
    ap.add_argument("--bf16", action="store_true", help="bfloat16 compute (JAX dtype, PyTorch autocast)")
    ap.add_argument("--recycle", action="store_true", help="the paper's recycling: two forward passes")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for FLOP utilisation")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default by backend)")
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="only XLA's FLOP count and memory plan of the step (no run: does it fit this device?)",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc instead of diffseg's reuse_freed_memory() (both frameworks)",
    )
    args = ap.parse_args(argv)
    # As the diffseg CLI does for training; one process, so PyTorch gets the same allocator.
    reuse = False if args.default_malloc else reuse_freed_memory()
    print(f"malloc: {'reuse freed memory' if reuse else 'glibc default'}", flush=True)
    # Before JAX starts its backend: on a GPU it would take 75 % of the memory up front, and
    # PyTorch shares the process. Growing on demand costs only the warm-up steps; PyTorch runs
    # first and empties its cache, so JAX may then grow to 90 % (the paper's step needs most).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

    dims = len(args.shape)
    backend = jax.default_backend()
    device = str(jax.devices()[0].device_kind)
    diffusion = GaussianDiffusion.linear()  # the paper's: T = 1000 resampled to K = 5
    data = Batch.random(args.batch, tuple(args.shape), args.classes, diffusion.num_steps)
    batch = jax_inputs(data)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    fast_impl = resolve_impl(args.impl, dims, dtype)

    def unet(impl: str) -> Any:
        return jax_network(args.arch, args.classes, args.channels, dims, args.bf16, impl)

    xla_steps = []  # the plain-XLA step once compiled for timing: its plan then costs nothing

    def xla_plan() -> dict[str, Any]:
        step, state = jax_model(unet("xla"), diffusion, args.recycle, batch, abstract=True)
        plan = xla_cost(xla_steps[0] if xla_steps else step, state, batch)
        gib = {k: None if v is None else round(v / 2**30, 2) for k, v in plan.items() if k != "flops"}
        print(f"XLA's plan: {plan['flops'] / 1e12:.3f} TFLOP/step, GiB {gib}", flush=True)
        return plan

    config = {
        "arch": args.arch,
        "shape": list(args.shape),
        "batch": args.batch,
        "channels": args.channels,
        "classes": args.classes,
        "dims": dims,
        "impl": args.impl,
        "fast_impl": fast_impl,
        "bf16": args.bf16,
        "recycle": args.recycle,
    }
    if args.compile_only:
        out = args.out or Path(__file__).parent / "results" / f"train_step_plan_{backend}_{args.arch}.json"
        atomic_write_json(out, {"backend": backend, "device": device, "config": config, "plan": xla_plan()})
        print(f"wrote {out}")
        return 0

    def jax_factory(impl: str) -> Callable[[], Runner]:
        def build() -> Runner:
            step, state = jax_model(unet(impl), diffusion, args.recycle, batch)
            if impl == "xla":
                xla_steps.append(step)
            runner = jax_runner(step, state, batch)
            print(f"JAX {impl}: compile + first step {seconds(runner.run):.1f} s", flush=True)
            return runner

        return build

    factories: dict[str, Callable[[], Runner]] = {}
    torch_device = None
    if not args.skip_torch:
        try:
            import torch
        except ImportError:
            ap.error("PyTorch is not installed: pip install -e '.[benchmark]', or pass --skip-torch")

        torch.set_num_threads(os.cpu_count() or 1)
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        for name, cl in [("torch", False)] + ([("torch_cl", True)] if args.torch_channels_last else []):
            factories[name] = lambda cl=cl: torch_runner(
                args.arch, data, args.channels, diffusion, args.recycle, args.bf16, torch_device, cl
            )
    factories["jax_fast"] = jax_factory(fast_impl)
    if not args.skip_xla and fast_impl != "xla":
        factories["jax_xla"] = jax_factory("xla")
    if not args.skip_torch:  # before any timing: the twin must be the same network
        check_parameter_counts(args.arch, args.classes, args.channels, dims, tuple(args.shape))
    # PyTorch goes first: it can give its memory back, JAX's allocator keeps what it took.
    interleave = backend == "cpu"
    times, counts, peaks = time_runners(factories, args.warmup, args.repeats, interleave)
    plan = xla_plan()
    flops = plan["flops"]

    print(f"parameters: {counts}", flush=True)
    if len(set(counts.values())) > 1:
        raise SystemExit(f"parameter counts differ: {counts}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:9s} {v:.3f} s/step  (all: {', '.join(f'{x:.3f}' for x in times[k])})", flush=True)

    torch_names = [k for k in ("torch", "torch_cl") if k in med]
    best_torch = min((med[k] for k in torch_names), default=float("nan"))
    ratio = best_torch / med["jax_fast"]
    peak = peak_tflops(device, args.bf16, args.peak_tflops)
    achieved = {k: flops / v / 1e12 for k, v in med.items()}
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
        "isa": isa_settings(None if args.skip_torch else torch),
        "malloc_reuse_freed_memory": reuse,
        "config": config
        | {"repeats": args.repeats, "timing": "interleaved" if interleave else "one model after the other"},
        "parameters": counts,
        "seconds_per_step": med,
        "steps_per_second": {k: 1 / v for k, v in med.items()},
        "all_seconds": times,
        "ratio_torch_over_jax_fast": ratio,  # best PyTorch variant timed / JAX fast
        "flops_per_step": flops,  # XLA's count for the plain-XLA step: the same math for all
        "xla_plan": plan,
        "tflops_per_s": achieved,
        "peak_tflops": peak,  # None: unknown for this device/precision (--peak-tflops)
        "flop_utilisation": {k: v / peak for k, v in achieved.items()} if peak else None,
        # peak device memory (accelerators report it; the CPU backend does not). JAX's is the
        # process's peak over every JAX model timed so far.
        "peak_bytes": peaks,
    }
    share = f" ({achieved['jax_fast'] / peak:.1%} of {peak} TFLOP/s)" if peak else ""
    print(
        f"JAX fast ({fast_impl}): {flops / 1e9:.1f} GFLOP/step, {achieved['jax_fast'] * 1e3:.1f} GFLOP/s"
        f" achieved{share}, steps/s {1 / med['jax_fast']:.3f}, peak device memory {peaks['jax_fast']}",
        flush=True,
    )
    if "jax_xla" in med:
        result["ratio_torch_over_jax_xla"] = best_torch / med["jax_xla"]
        result["speedup_fast_over_xla"] = med["jax_xla"] / med["jax_fast"]
    out = args.out or Path(__file__).parent / "results" / f"train_step_{backend}_{args.arch}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    print(f"JAX/PyTorch speed ratio (torch_time / jax_time, >=1 means JAX faster): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
