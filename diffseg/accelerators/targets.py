"""GPU cards this machine does not have: their facts, and XLA's GPU compiler aimed at them.

XLA's GPU compiler can compile for a card without one present: the CUDA PJRT plugin makes a
"compile-only" device from a ``GpuTargetConfigProto`` (text form) describing the card, and
``jax.jit(...).lower(...).compile()`` on arrays sharded over that device returns the card's own
memory plan (``memory_analysis()``). ``diffseg plan --target`` uses it; it needs the optional
``gpu-plan`` extra (``pip install -e ".[gpu-plan]"``: jax's CUDA 12 plugin at jax's version).

``KNOWN_TARGETS`` holds public spec-sheet facts of a few cards, from which the text proto is
generated (only the fields the installed plugin accepts, :func:`target_topology`). A user's own
card is a text-proto file (``--target path/to/card.txtpb``), passed to the plugin as written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffseg.errors import ConfigError

GPU_PLAN_EXTRA = 'the gpu-plan extra: pip install -e ".[gpu-plan]" (jax\'s CUDA 12 plugin, no GPU needed)'
# cuDNN major the jax CUDA 12 wheels are built against (9); XLA only gates a few fusions on it.
DNN_VERSION = (9, 8, 0)
GB = 10**9  # bandwidths are in decimal GB/s
GiB = 2**30
KiB = 2**10
MiB = 2**20


@dataclass(frozen=True)
class GpuTarget:
    """One card: what XLA's GPU compiler needs to plan for it, and its peak tensor throughput.

    ``memory_bytes`` is the card's memory (NVIDIA's "GB" for these cards is GiB, the HBM/GDDR
    capacity; the driver keeps a few hundred MiB of it, well inside ``diffseg.accelerators.memory.HEADROOM``).
    ``peak_bf16_tflops``/``peak_fp16_tflops``: dense (not 2:4 sparse) tensor-core TFLOP/s with
    float32 accumulation, the spec sheet's boost-clock figures; ``None`` where the card has none.
    """

    name: str
    description: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    core_count: int = 0  # streaming multiprocessors
    fpus_per_core: int = 0  # FP32 lanes per SM
    threads_per_core_limit: int = 2048
    shared_memory_per_core: int = 0  # bytes of shared memory per SM
    shared_memory_per_block_optin: int = 0  # the most one block may opt in to
    memory_bandwidth: int = 0  # bytes/s
    l2_cache_size: int = 0  # bytes
    clock_rate_ghz: float = 0.0  # boost clock
    peak_bf16_tflops: float | None = None
    peak_fp16_tflops: float | None = None
    source: Path | None = None  # a user's spec file (then its text is passed as written)
    spec_text: str | None = field(default=None, repr=False)

    @property
    def has_bf16(self) -> bool:
        """bf16 tensor cores (Ampere and later, compute capability >= 8.0); older cards run bf16
        convolutions and matrix products as float32."""
        return self.compute_capability >= (8, 0)

    def fields(self) -> list[tuple[str, Any]]:
        """The text proto's fields in order, ``(name, value)`` with nested messages as lists."""
        major, minor = self.compute_capability
        info: list[tuple[str, Any]] = [
            ("threads_per_block_limit", 1024),
            ("threads_per_warp", 32),
            ("shared_memory_per_block", 48 * KiB),
            ("shared_memory_per_core", self.shared_memory_per_core),
            ("threads_per_core_limit", self.threads_per_core_limit),
            ("core_count", self.core_count),
            ("fpus_per_core", self.fpus_per_core),
            ("block_dim_limit_x", 2**31 - 1),
            ("block_dim_limit_y", 65535),
            ("block_dim_limit_z", 65535),
            ("memory_bandwidth", self.memory_bandwidth),
            ("l2_cache_size", self.l2_cache_size),
            ("clock_rate_ghz", self.clock_rate_ghz),
            ("device_memory_size", self.memory_bytes),
            ("shared_memory_per_block_optin", self.shared_memory_per_block_optin),
            ("cuda_compute_capability", [("major", major), ("minor", minor)]),
            ("registers_per_core_limit", 65536),
            ("registers_per_block_limit", 65536),
        ]
        dnn = [("major", DNN_VERSION[0]), ("minor", DNN_VERSION[1]), ("patch", DNN_VERSION[2])]
        return [
            ("gpu_device_info", info),
            ("platform_name", "CUDA"),
            ("dnn_version_info", dnn),
            ("device_description_str", self.description),
        ]

    def text_proto(self, skip: frozenset[str] = frozenset()) -> str:
        """The ``GpuTargetConfigProto`` in text form, without the fields named in ``skip``."""
        if self.spec_text is not None:
            return self.spec_text
        return _render(self.fields(), skip)


def _render(fields: list[tuple[str, Any]], skip: frozenset[str], indent: str = "") -> str:
    lines = []
    for name, value in fields:
        if name in skip:
            continue
        if isinstance(value, list):
            lines += [f"{indent}{name} {{", _render(value, skip, indent + "  ").rstrip("\n"), f"{indent}}}"]
        elif isinstance(value, str):
            lines.append(f'{indent}{name}: "{value}"')
        else:
            lines.append(f"{indent}{name}: {value}")
    return "\n".join(lines) + "\n"


# NVIDIA's data sheets and CUDA programming guide (per compute capability: shared memory per SM
# and per block, FP32 lanes per SM, threads per SM). SXM parts where a card comes in several.
_HOPPER = dict(
    compute_capability=(9, 0), core_count=132, fpus_per_core=128, shared_memory_per_core=228 * KiB,
    shared_memory_per_block_optin=227 * KiB, l2_cache_size=50 * MiB, clock_rate_ghz=1.98,
    peak_bf16_tflops=989.4, peak_fp16_tflops=989.4,
)  # fmt: skip
_A100 = dict(
    compute_capability=(8, 0), core_count=108, fpus_per_core=64, shared_memory_per_core=164 * KiB,
    shared_memory_per_block_optin=163 * KiB, l2_cache_size=40 * MiB, clock_rate_ghz=1.41,
    peak_bf16_tflops=312.0, peak_fp16_tflops=312.0,
)  # fmt: skip
KNOWN_TARGETS: dict[str, GpuTarget] = {
    t.name: t
    for t in (
        GpuTarget("h100-80gb", "NVIDIA H100 80GB HBM3", 80 * GiB, memory_bandwidth=3350 * GB, **_HOPPER),
        GpuTarget("h200", "NVIDIA H200", 141 * GiB, memory_bandwidth=4800 * GB, **_HOPPER),
        GpuTarget("a100-40gb", "NVIDIA A100-SXM4-40GB", 40 * GiB, memory_bandwidth=1555 * GB, **_A100),
        GpuTarget("a100-80gb", "NVIDIA A100-SXM4-80GB", 80 * GiB, memory_bandwidth=2039 * GB, **_A100),
        GpuTarget(
            "a6000", "NVIDIA RTX A6000", 48 * GiB, (8, 6), core_count=84, fpus_per_core=128,
            threads_per_core_limit=1536, shared_memory_per_core=100 * KiB,
            shared_memory_per_block_optin=99 * KiB, memory_bandwidth=768 * GB,
            l2_cache_size=6 * MiB, clock_rate_ghz=1.80, peak_bf16_tflops=154.8, peak_fp16_tflops=154.8,
        ),
        GpuTarget(
            "v100-16gb", "Tesla V100-SXM2-16GB", 16 * GiB, (7, 0), core_count=80, fpus_per_core=64,
            shared_memory_per_core=96 * KiB, shared_memory_per_block_optin=96 * KiB,
            memory_bandwidth=900 * GB, l2_cache_size=6 * MiB, clock_rate_ghz=1.53,
            peak_bf16_tflops=None, peak_fp16_tflops=125.0,
        ),
    )
}  # fmt: skip

# --- a user's spec file ----------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|([A-Za-z_][A-Za-z0-9_.]*)|("(?:[^"\\]|\\.)*")|([-+0-9.eE]+)|([{}:<>]))')


def _tokens(text: str, path: Path) -> Iterator[str]:
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            return
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            line = text.count("\n", 0, pos) + 1
            raise ConfigError(f"{path}: line {line}: cannot read {text[pos:].strip()[:20]!r} (a text proto)")
        pos = m.end()
        if m.group(1) is None:
            yield m.group(0).strip()


def parse_text_proto(text: str, path: Path) -> dict[str, Any]:
    """A protobuf text-format message as nested dicts (a repeated field keeps its last value);
    only the syntax is checked here, the field names by the plugin. Errors name ``path``."""
    tokens = list(_tokens(text, path))
    pos = 0

    def message(closing: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == closing:
                pos += 1
                return out
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok):
                raise ConfigError(f"{path}: expected a field name, got {tok!r}")
            pos += 1
            nxt = tokens[pos] if pos < len(tokens) else None
            if nxt == ":":
                pos += 1
                nxt = tokens[pos] if pos < len(tokens) else None
            if nxt in ("{", "<"):
                pos += 1
                out[tok] = message("}" if nxt == "{" else ">")
            elif nxt is None or nxt in "{}<>:":
                raise ConfigError(f"{path}: field {tok!r} has no value")
            else:
                pos += 1
                out[tok] = _scalar(nxt)
        if closing is not None:
            raise ConfigError(f"{path}: a {{ is never closed")
        return out

    return message(None)


def _scalar(tok: str) -> Any:
    if tok.startswith('"'):
        return tok[1:-1].encode().decode("unicode_escape")
    try:
        return int(tok)
    except ValueError:
        pass
    try:
        return float(tok)
    except ValueError:
        return tok  # an enum name or true/false


def target_from_file(path: str | Path) -> GpuTarget:
    """A card from a user's ``GpuTargetConfigProto`` text file; it must say the card's memory
    (``gpu_device_info.device_memory_size``) and ``cuda_compute_capability``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--target {path}: cannot read it ({err.strerror})") from None
    spec = parse_text_proto(text, path)
    info = spec.get("gpu_device_info")
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: no gpu_device_info {{...}} message")
    memory = info.get("device_memory_size")
    if not isinstance(memory, int) or memory <= 0:
        raise ConfigError(f"{path}: gpu_device_info.device_memory_size: expected the card's bytes")
    cc = info.get("cuda_compute_capability")
    if not isinstance(cc, dict) or not isinstance(cc.get("major"), int):
        raise ConfigError(f"{path}: gpu_device_info.cuda_compute_capability {{major minor}} is missing")
    return GpuTarget(
        name=path.stem,
        description=str(spec.get("device_description_str") or path.stem),
        memory_bytes=memory,
        compute_capability=(int(cc["major"]), int(cc.get("minor", 0))),
        core_count=int(info.get("core_count", 0)),
        source=path,
        spec_text=text,
    )


def get_target(name_or_path: str | Path) -> GpuTarget:
    """A known card by name (``KNOWN_TARGETS``: h100-80gb, h200, a100-40gb, a100-80gb, a6000,
    v100-16gb) or a user's spec file (a path ending in ``.txtpb``/``.textproto``/``.pbtxt``, or any
    existing file)."""
    key = str(name_or_path)
    if key.lower() in KNOWN_TARGETS:
        return KNOWN_TARGETS[key.lower()]
    path = Path(key)
    if path.suffix in (".txtpb", ".textproto", ".pbtxt", ".txt") or path.exists():
        return target_from_file(path)
    raise ConfigError(
        f"--target {key!r}: not a known card ({', '.join(KNOWN_TARGETS)}) nor a spec file (.txtpb)"
    )


def target_for_device(device_kind: str) -> GpuTarget | None:
    """The known card a real device is (JAX's ``device_kind``, e.g. "NVIDIA H100 80GB HBM3"), if any."""
    kind = device_kind.lower()
    for target in KNOWN_TARGETS.values():
        if target.description.lower() in kind or kind in target.description.lower():
            return target
    return None


def peak_tflops_for_device(device_kind: str, bf16: bool) -> float | None:
    """A real device's peak dense tensor TFLOP/s at the run's precision (bf16, else fp16 as the
    nearest tensor-core rate of a float32 run's TF32), when it is a known card."""
    target = target_for_device(device_kind)
    if target is None:
        return None
    return target.peak_bf16_tflops if bf16 else target.peak_fp16_tflops


# --- the compile-only device ------------------------------------------------------------------------

# Fields a plugin older or newer than the one this table was written against may not know; the
# rest are as old as deviceless compilation itself.
OPTIONAL_FIELDS = (
    "shared_memory_per_block_optin",
    "registers_per_core_limit",
    "registers_per_block_limit",
    "dnn_version_info",
    "device_description_str",
)
# XLA's options for compiling for a compile-only device. Without a GPU there is no autotuning, and
# the Triton GEMM emitter's untuned tiling fails on some of the network's matrix products ("Couldn't
# find output tile sizes"): they go to cuBLAS instead, whose memory is that of the same product.
COMPILER_OPTIONS: dict[str, Any] = {"xla_gpu_enable_triton_gemm": False}
_accepted: dict[str, frozenset[str]] = {}  # target name -> fields skipped for the installed plugin


def _cuda_topology(text: str) -> Any:
    """The plugin's compile-only device for ``text``; ``ValueError`` when it cannot parse it."""
    from jax._src.lib import _jax
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
    except _jax.JaxRuntimeError as err:
        if "Failed to parse" in str(err):
            raise ValueError(str(err)) from None
        raise


def _ensure_plugin() -> None:
    """Register the CUDA plugin's topology factory, even on a machine without CUDA.

    JAX's plugin discovery checks the CUDA runtime's version first and, with no GPU, gives up
    before registering the plugin. The check is skipped when only the CPU platform was asked for,
    or with ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``: the plugin is then registered again with the
    check skipped, which adds the compile-only topology (the CPU backend stays the default)."""
    from jax._src import xla_bridge

    xla_bridge._discover_and_register_pjrt_plugins()
    if "cuda" in xla_bridge._topology_factories:
        return
    try:
        import jax_plugins.xla_cuda12 as plugin
    except ImportError:
        raise ConfigError(f"compiling for a GPU target needs {GPU_PLAN_EXTRA}") from None
    before = os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK")
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    try:
        plugin.initialize()
    finally:
        if before is None:
            del os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"]
    if "cuda" not in xla_bridge._topology_factories:
        raise ConfigError(
            f"jax's CUDA plugin did not register a compile-only device; reinstall {GPU_PLAN_EXTRA}"
        )


def target_topology(target: GpuTarget) -> Any:
    """``jax.experimental.topologies.TopologyDescription`` of one compile-only device of ``target``.

    A known card's fields the installed plugin does not know (``OPTIONAL_FIELDS``) are left out;
    a user's file is passed as written and an unreadable one is a ``ConfigError`` naming it."""
    _ensure_plugin()
    if target.spec_text is not None:
        try:
            return _cuda_topology(target.spec_text)
        except ValueError:
            raise ConfigError(
                f"{target.source}: jax's CUDA plugin cannot parse it as a GpuTargetConfigProto"
                " (a misspelt field, or one this plugin does not know)"
            ) from None
    skip = _accepted.get(target.name)
    if skip is not None:
        return _cuda_topology(target.text_proto(skip))
    try:
        topo = _cuda_topology(target.text_proto())
        skip = frozenset()
    except ValueError:
        skip = frozenset(OPTIONAL_FIELDS)
        try:
            _cuda_topology(target.text_proto(skip))
        except ValueError:
            raise ConfigError(
                f"--target {target.name}: the installed CUDA plugin rejects the card's spec"
            ) from None
        for name in OPTIONAL_FIELDS:  # add back each field the plugin knows
            try:
                _cuda_topology(target.text_proto(skip - {name}))
                skip = skip - {name}
            except ValueError:
                pass
        topo = _cuda_topology(target.text_proto(skip))
    _accepted[target.name] = skip
    return topo


def target_mesh(target: GpuTarget, axis: str = "data") -> Any:
    """A 1-device ``jax.sharding.Mesh`` over ``target``'s compile-only device (axis ``axis``)."""
    from jax.experimental import topologies

    return topologies.make_mesh(target_topology(target), (1,), (axis,))
