"""XLA's GPU compiler aimed at a card this machine does not have: the card's text proto and the
CUDA plugin's compile-only device.

The CUDA PJRT plugin makes a "compile-only" device from a ``GpuTargetConfigProto`` (text form)
describing the card; ``jax.jit(...).lower(...).compile()`` on arrays placed on it returns the
card's own memory plan. It needs the optional ``gpu-plan`` extra (``pip install -e ".[gpu-plan]"``:
jax's CUDA 12 plugin at jax's version); no GPU, driver or CUDA toolkit. A known card's proto is
generated from its facts (``diffseg.accelerators.targets.GpuTarget``); a user's own card is a
text-proto file (``--target path/to/card.txtpb``), passed to the plugin as written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffseg.accelerators.targets import GpuTarget
from diffseg.errors import ConfigError

GPU_PLAN_EXTRA = 'the gpu-plan extra: pip install -e ".[gpu-plan]" (jax\'s CUDA 12 plugin, no GPU needed)'


def render_text_proto(fields: list[tuple[str, Any]], skip: frozenset[str], indent: str = "") -> str:
    lines = []
    for name, value in fields:
        if name in skip:
            continue
        if isinstance(value, list):
            inner = render_text_proto(value, skip, indent + "  ").rstrip("\n")
            lines += [f"{indent}{name} {{", inner, f"{indent}}}"]
        elif isinstance(value, str):
            lines.append(f'{indent}{name}: "{value}"')
        else:
            lines.append(f"{indent}{name}: {value}")
    return "\n".join(lines) + "\n"


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


def cuda_topology(target: GpuTarget) -> Any:
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
