"""oneDNN 3D convolutions for the CPU backend, compiled on first use and called through XLA's FFI.

XLA's CPU convolution runs 3D convolutions at a fraction of this CPU's peak; oneDNN, the library
behind PyTorch's CPU convolutions, runs them near it. ``onednn_conv.cc`` wraps oneDNN's forward,
backward-data and backward-weights primitives as three XLA FFI handlers. This module compiles it
once per (source, jaxlib, oneDNN) into a cache folder, loads it and registers the handlers.

Where that is impossible (no C++ compiler, no oneDNN, a JAX without ``jax.ffi``, or
``DIFFSEG_ONEDNN=0``), ``available()`` says why once, as a warning, and returns False; the caller
then falls back to the pure-XLA implementations in ``conv.py``.

oneDNN comes from the ``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` wheels (Linux x86-64),
or from a prefix named by ``DIFFSEG_ONEDNN_ROOT`` (for example a conda env with conda-forge's
``onednn``). The compiled library goes to ``DIFFSEG_CACHE`` (default ``~/.cache/diffseg``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

from diffseg.io import atomic_path

SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {
    "fwd": ("diffseg_conv3d_fwd", "DiffsegConv3dFwd"),
    "bwd_data": ("diffseg_conv3d_bwd_data", "DiffsegConv3dBwdData"),
    "bwd_weights": ("diffseg_conv3d_bwd_weights", "DiffsegConv3dBwdWeights"),
}


class OneDNNUnavailable(RuntimeError):
    """Why the oneDNN convolution cannot be used here."""


def _onednn_root() -> Path:
    """The prefix holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``."""
    candidates = []
    if root := os.environ.get("DIFFSEG_ONEDNN_ROOT"):
        candidates.append(Path(root))
    try:
        # The wheels' headers and library are data files: <prefix>/include/..., <prefix>/lib/...
        for f in importlib.metadata.distribution("onednn-devel-cpu-gomp").files or []:
            if str(f).endswith("include/oneapi/dnnl/dnnl.hpp"):
                candidates.append(Path(f.locate()).resolve().parents[3])
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates += [Path(sys.prefix), Path(os.environ.get("CONDA_PREFIX", sys.prefix))]
    candidates = list(dict.fromkeys(candidates))  # CONDA_PREFIX is often sys.prefix
    for root in candidates:
        if (root / "include/oneapi/dnnl/dnnl.hpp").is_file() and any((root / "lib").glob("libdnnl.so*")):
            return root
    raise OneDNNUnavailable(
        "oneDNN headers and library not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or set DIFFSEG_ONEDNN_ROOT"
    )


def _compile(root: Path) -> Path:
    """Compile ``onednn_conv.cc`` into the cache (once per source/jaxlib/oneDNN) and return it."""
    if not hasattr(jax, "ffi"):
        raise OneDNNUnavailable(f"jax {jax.__version__} has no jax.ffi (needs jax >= 0.4.38)")
    cxx_name = os.environ.get("CXX", "c++")
    cxx = shutil.which(cxx_name)
    if cxx is None:
        raise OneDNNUnavailable(f"C++ compiler {cxx_name!r} not found (install g++, or set CXX)")
    flags = [
        "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", f"-I{root / 'include'}",
        str(SOURCE), f"-L{root / 'lib'}", "-ldnnl", f"-Wl,-rpath,{root / 'lib'}",
    ]  # fmt: skip
    key = [SOURCE.read_bytes(), (root / "include/oneapi/dnnl/dnnl_version.h").read_bytes()]
    key += [importlib.metadata.version("jaxlib").encode(), cxx.encode(), " ".join(flags).encode()]
    cache = Path(os.environ.get("DIFFSEG_CACHE", Path.home() / ".cache" / "diffseg"))
    out = cache / f"onednn_conv-{hashlib.sha256(b'|'.join(key)).hexdigest()[:16]}.so"
    if out.is_file():
        return out
    # Concurrent jobs may compile at once: each writes its own temporary file, renamed atomically.
    with atomic_path(out) as tmp:
        cmd = [cxx, *flags, "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log = proc.stderr[-2000:]
            raise OneDNNUnavailable(f"compiling {SOURCE.name} failed:\n{' '.join(cmd)}\n{log}")
    return out


@functools.cache
def available() -> bool:
    """Compile, load and register the oneDNN convolution; False (with one warning) if impossible."""
    if os.environ.get("DIFFSEG_ONEDNN", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_compile(_onednn_root())))
        for name, symbol in _TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OneDNNUnavailable, OSError, AttributeError) as err:
        warnings.warn(f"oneDNN 3D convolution unavailable, using the XLA one: {err}", stacklevel=2)
        return False
    return True


def _call(which: str, shapes: list[tuple[int, ...]], *args: jax.Array) -> list[jax.Array]:
    if not available():
        raise OneDNNUnavailable("the oneDNN convolution is unavailable (see the warning above)")
    out = [jax.ShapeDtypeStruct(shape, np.float32) for shape in shapes]
    return jax.ffi.ffi_call(_TARGETS[which][0], out, vmap_method="sequential")(*args)


def conv3d_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """SAME stride-1 convolution plus bias: x ``(B, D, H, W, Ci)`` → ``(B, D, H, W, Co)``.

    kernel ``(kd, kh, kw, Ci, Co)``: odd sizes, axes in the data's spatial order; bias ``(Co,)``.
    float32 only.
    """
    return _call("fwd", [x.shape[:-1] + kernel.shape[-1:]], x, kernel, bias)[0]


def conv3d_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """Gradient w.r.t. the input: dy ``(B, D, H, W, Co)`` → ``(B, D, H, W, Ci)``; kernel as above."""
    return _call("bwd_data", [dy.shape[:-1] + kernel.shape[-2:-1]], dy, kernel)[0]


def conv3d_params_grad(
    x: jax.Array, dy: jax.Array, ksize: tuple[int, int, int]
) -> tuple[jax.Array, jax.Array]:
    """Gradients w.r.t. kernel and bias: x ``(B, D, H, W, Ci)``, dy ``(B, D, H, W, Co)`` →
    ``(*ksize, Ci, Co)``, ``(Co,)``."""
    ci, co = x.shape[-1], dy.shape[-1]
    dk, db = _call("bwd_weights", [tuple(ksize) + (ci, co), (co,)], x, dy)
    return dk, db
