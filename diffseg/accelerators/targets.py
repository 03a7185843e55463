"""Accelerators this machine does not have: GPU cards and TPU slices, their facts, and the compiler
of each aimed at them (``diffseg plan --target``).

A target is what ``diffseg plan`` needs to plan a step without the hardware: the JAX devices it
has (``devices``), the memory of each (``memory_bytes``), its peak dense throughput, and a mesh of
compile-only devices (:func:`target_mesh`) on which ``jax.jit(...).lower(...).compile()`` returns
that hardware's own memory plan and cost analysis. Two kinds, one interface:

- ``GpuTarget``: one card; XLA's GPU compiler through jax's CUDA plugin (``diffseg.accelerators.cuda``,
  the ``gpu-plan`` extra). A user's own card is a text-proto file.
- ``TpuTarget``: one TPU slice (a VM's chips); the TPU compiler in libtpu (``diffseg.accelerators.tpu``,
  the ``tpu`` extra), which describes a slice by its topology without a TPU.

``KNOWN_TARGETS`` holds public spec-sheet facts of a few of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from diffseg.errors import ConfigError

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
    platform: ClassVar[str] = "gpu"
    devices: ClassVar[int] = 1  # one card: a step's batch is not split
    compiler: ClassVar[str] = "XLA's GPU compiler"

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
        from diffseg.accelerators.cuda import render_text_proto

        return render_text_proto(self.fields(), skip)

    def summary(self) -> str:
        """One line for a plan's heading: name, card, compute capability, memory."""
        cc = ".".join(map(str, self.compute_capability))
        return f"{self.name} ({self.description}, compute capability {cc}, {self.memory_bytes / GiB:.2f} GiB)"

    def facts(self) -> dict[str, Any]:
        """The target as a plan's JSON records it."""
        return {
            "name": self.name, "platform": self.platform, "description": self.description,
            "devices": self.devices, "memory_bytes": self.memory_bytes,
            "compute_capability": list(self.compute_capability), "has_bf16": self.has_bf16,
            "peak_bf16_tflops": self.peak_bf16_tflops, "peak_fp16_tflops": self.peak_fp16_tflops,
            "spec_file": str(self.source) if self.source else None,
        }  # fmt: skip


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
KNOWN_GPUS: dict[str, GpuTarget] = {
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


@dataclass(frozen=True)
class TpuTarget:
    """One TPU slice: the topology libtpu's compiler plans for, and each JAX device's memory and peak.

    ``topology`` is libtpu's name for the slice's chips (``"v3:2x2"``: 4 chips); ``chip_config``
    says how a chip's TensorCores appear to JAX: ``None`` is one device per TensorCore (v2, v3,
    v5e, v6e: one core per chip from v5e on), ``"megacore"`` one device per chip (v4, v5p: two
    cores fused). ``memory_bytes``, ``peak_bf16_tflops`` and ``hbm_gb_s`` are per JAX device, from
    Google's published per-chip figures divided by the devices per chip.
    """

    name: str
    description: str
    topology: str
    chips: int
    devices: int
    memory_bytes: int
    peak_bf16_tflops: float
    hbm_gb_s: float
    chip_config: str | None = None
    device_kind: str = ""  # what JAX calls one device of it, e.g. "TPU v3"
    platform: ClassVar[str] = "tpu"
    compiler: ClassVar[str] = "the TPU compiler (libtpu)"
    has_bf16: ClassVar[bool] = True
    peak_fp16_tflops: ClassVar[None] = None  # TPUs have no fp16 matrix units; float32 runs as bf16 passes
    source: ClassVar[None] = None

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name of the slice, e.g. ``v3-8`` (what ``TPU_ACCELERATOR_TYPE`` holds on its VM)."""
        return self.name.removeprefix("tpu-")

    def summary(self) -> str:
        """One line for a plan's heading: name, chips, devices and HBM per device."""
        cores = "TensorCores" if self.chip_config is None else "megacore devices"
        return (
            f"{self.name} ({self.description}: {self.chips} chips, {self.devices} {cores},"
            f" {self.memory_bytes / GiB:.2f} GiB HBM each)"
        )

    def facts(self) -> dict[str, Any]:
        """The target as a plan's JSON records it."""
        return {
            "name": self.name, "platform": self.platform, "description": self.description,
            "topology": self.topology, "chip_config": self.chip_config, "chips": self.chips,
            "devices": self.devices, "memory_bytes": self.memory_bytes, "has_bf16": True,
            "peak_bf16_tflops": self.peak_bf16_tflops, "hbm_gb_s": self.hbm_gb_s,
        }  # fmt: skip


def _tpu(
    name: str,
    description: str,
    kind: str,
    topology: str,
    chips: int,
    cores_per_chip: int,
    chip_hbm_gib: int,
    chip_bf16_tflops: float,
    chip_hbm_gb_s: float,
    megacore: bool = False,
) -> TpuTarget:
    per_chip = 1 if megacore else cores_per_chip  # JAX devices per chip
    return TpuTarget(
        name, description, topology, chips, chips * per_chip, chip_hbm_gib * GiB // per_chip,
        chip_bf16_tflops / per_chip, chip_hbm_gb_s / per_chip, "megacore" if megacore else None, kind,
    )  # fmt: skip


# Google Cloud's published per-chip figures: HBM (GiB), peak bf16 TFLOP/s, HBM bandwidth (GB/s).
# The 8-TensorCore slices a single TPU VM holds; v3-8 is the paper's ("16×8 GB device memory").
# v3-32 is a pod slice of several TPU VMs (hosts).
KNOWN_TPUS: dict[str, TpuTarget] = {
    t.name: t
    for t in (
        _tpu("tpu-v3-8", "Cloud TPU v3-8", "TPU v3", "v3:2x2", 4, 2, 32, 123.0, 900.0),
        _tpu("tpu-v4-8", "Cloud TPU v4-8", "TPU v4", "v4:2x2x1", 4, 2, 32, 275.0, 1200.0, megacore=True),
        _tpu("tpu-v5p-8", "Cloud TPU v5p-8", "TPU v5", "v5p:2x2x1", 4, 2, 95, 459.0, 2765.0, megacore=True),
        _tpu("tpu-v5e-8", "Cloud TPU v5e-8 (v5 lite)", "TPU v5 lite", "v5e:2x4", 8, 1, 16, 197.0, 819.0),
        _tpu("tpu-v6e-8", "Cloud TPU v6e-8 (Trillium)", "TPU v6 lite", "v6e:2x4", 8, 1, 32, 918.0, 1640.0),
        # A pod slice: 4 hosts of 4 chips, one program on every host (diffseg.distributed); the
        # plan is per TensorCore, as on a v3-8, with the batch split over all 32.
        _tpu("tpu-v3-32", "Cloud TPU v3-32, 4 hosts", "TPU v3", "v3:4x4", 16, 2, 32, 123.0, 900.0),
    )
}  # fmt: skip
Target = GpuTarget | TpuTarget
KNOWN_TARGETS: Mapping[str, Target] = {**KNOWN_GPUS, **KNOWN_TPUS}


def get_target(name_or_path: str | Path) -> Target:
    """A known card or slice by name (``KNOWN_TARGETS``: h100-80gb, h200, a100-40gb, a100-80gb,
    a6000, v100-16gb; tpu-v3-8, tpu-v4-8, tpu-v5p-8, tpu-v5e-8, tpu-v6e-8, tpu-v3-32) or a user's GPU spec
    file (a path ending in ``.txtpb``/``.textproto``/``.pbtxt``, or any existing file)."""
    key = str(name_or_path)
    if key.lower() in KNOWN_TARGETS:
        return KNOWN_TARGETS[key.lower()]
    path = Path(key)
    if path.suffix in (".txtpb", ".textproto", ".pbtxt", ".txt") or path.exists():
        from diffseg.accelerators.cuda import target_from_file

        return target_from_file(path)
    raise ConfigError(
        f"--target {key!r}: not a known card or TPU slice ({', '.join(KNOWN_TARGETS)}) nor a GPU"
        " spec file (.txtpb)"
    )


def target_for_device(device_kind: str, devices: int = 1) -> Target | None:
    """The known target a real device is, if any: a card by JAX's ``device_kind`` ("NVIDIA H100
    80GB HBM3"), or the TPU slice of ``devices`` devices of that kind ("TPU v3" × 8: tpu-v3-8)."""
    kind = device_kind.lower()
    for tpu in KNOWN_TPUS.values():
        if tpu.device_kind.lower() == kind and tpu.devices == devices:
            return tpu
    for target in KNOWN_GPUS.values():
        if target.description.lower() in kind or kind in target.description.lower():
            return target
    return None


def peak_tflops_for_device(device_kind: str, bf16: bool) -> float | None:
    """A real device's peak dense TFLOP/s at the run's precision (bf16, else fp16 as the nearest
    tensor-core rate of a float32 run's TF32; a TPU's bf16 rate either way, as its matrix units
    run float32 as bf16 passes), when it is a known card or TPU core."""
    kind = device_kind.lower()
    for tpu in KNOWN_TPUS.values():
        if tpu.device_kind.lower() == kind:
            return tpu.peak_bf16_tflops  # per JAX device, whatever the slice
    target = target_for_device(device_kind)
    if target is None:
        return None
    return target.peak_bf16_tflops if bf16 else target.peak_fp16_tflops


# --- the compile-only device ------------------------------------------------------------------------


def target_mesh(target: Target, axis: str = "data") -> Any:
    """A 1-D ``jax.sharding.Mesh`` over ``target``'s compile-only devices (axis ``axis``): one card,
    or every device of a TPU slice, over which training splits a step's batch."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        from diffseg.accelerators.tpu import tpu_topology

        topology = tpu_topology(target)
    else:
        from diffseg.accelerators.cuda import cuda_topology

        topology = cuda_topology(target)
    return topologies.make_mesh(topology, (len(topology.devices),), (axis,))


def compiler_options(target: Target) -> dict[str, Any]:
    """XLA options for compiling for ``target`` without it (none for a TPU slice)."""
    if target.platform == "gpu":
        from diffseg.accelerators.cuda import COMPILER_OPTIONS

        return dict(COMPILER_OPTIONS)
    return {}
