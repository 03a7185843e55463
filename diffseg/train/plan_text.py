"""``diffseg plan``'s text, made from the plan's facts alone (``diffseg.train.plan.plan``).

Every number printed here is in the facts (and so in ``--json``); a new kind of target adds facts,
not branches: the heading, the budget rule and the compiler's name come with the target.
"""

from __future__ import annotations

from typing import Any

import yaml


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _tflop(n: float) -> str:
    return f"{n / 1e12:.3f} TFLOP"


def _network(facts: dict[str, Any]) -> list[str]:
    net = facts["network"]
    kind = "diffusion (image + noisy mask, step t)" if net["diffusion"] else "segmentation"
    lines = ["## network", "", f"architecture: {net['arch']} U-Net, {net['dims']}D, {kind}"]
    lines.append(f"channels: {net['channels']}, classes: {facts['classes']} (with background)")
    if net["diffusion"] and net["arch"] == "reference":
        tc = net["time_conditioning"]
        note = " (the reference's placement: the output does not depend on t)" if tc == "reference" else ""
        lines.append(f"time conditioning: {tc}{note}")
    return lines + [f"parameters: {facts['parameters']}"]


def _step(facts: dict[str, Any]) -> list[str]:
    shape, batch = facts["volume_shape"], facts["volumes_per_step"]
    lines = ["## one training step", ""]
    if facts["network"]["dims"] == 2:
        lines.append(
            f"consumes: {batch} volumes of {'×'.join(map(str, shape))} = {facts['slices_per_step']} slices"
            f" of {shape[0]}×{shape[1]} through the 2D network; loss on the reassembled volumes"
        )
    else:
        lines.append(f"consumes: {batch} volumes of {'×'.join(map(str, shape))}")
    if "diffusion" in facts:
        d = facts["diffusion"]
        passes = "1 forward + 1 backward pass"
        if d["recycle"]:
            passes = "2 forward passes (recycling: one without gradient) + 1 backward"
        lines.append(f"diffusion: K = {d['steps']} training steps, t = {d['timesteps']}; {passes}")
    precision = "bfloat16 compute, float32 parameters" if facts["bf16"] else "float32"
    lines.append(f"precision: {precision}; steps: {facts['steps']}")
    if facts.get("bf16_warning"):
        target = facts["target"]
        cc = ".".join(map(str, target["compute_capability"]))
        lines.append(
            f"warning: {target['name']} (compute capability {cc}) has no bf16 tensor cores:"
            " bf16 convolutions run as float32 on this card; set train.bf16: false"
        )
    return lines


def _table(facts: dict[str, Any]) -> list[str]:
    """Every micro-batch with and without remat against the budget."""
    budget = facts["budget_bytes"]
    lines = [
        f"budget per device: {facts['budget_rule']}",
        "micro-batch  remat  total/device  temporaries  FLOPs/step  fits",
    ]
    for t in sorted(facts["tried"], key=lambda t: (t["remat"], -t["micro_batch"])):
        if not t.get("compiled", True):
            lines.append(
                f"{t['micro_batch']:>11}  {'on' if t['remat'] else 'off':>5}  {_gib(t['total_bytes']):>12}"
                "  (the compiler ran out of device memory)                no"
            )
            continue
        fits = "yes" if t["total_bytes"] <= budget else "no"
        lines.append(
            f"{t['micro_batch']:>11}  {'on' if t['remat'] else 'off':>5}"
            f"  {_gib(t['total_bytes']):>12}  {_gib(t['temp_bytes']):>11}"
            f"  {(t.get('flops_per_step') or t['flops']) / 1e12:>7.3f} TF  {fits}"
        )
    return lines


def _flops(facts: dict[str, Any]) -> list[str]:
    xla, passes = facts["xla"], facts["xla"]["passes"]
    if not xla.get("compiled", True):
        return [
            f"FLOPs: none counted (the compiler ran out of device memory: {_gib(xla['total_bytes'])} needed)"
        ]
    how = [f"the compiler's count of one pass × {passes} passes"] if passes > 1 else []
    how += ["counted on the step's HLO before optimisation"] if xla["flops_of"] == "lowered" else []
    text = f"FLOPs: {_tflop(xla['flops_per_step'])} per step"
    if xla["devices"] > 1:
        text += f" ({_tflop(xla['flops'])} per device × {xla['devices']} devices)"
    lines = [text + (f" ({'; '.join(how)})" if how else "")]
    if xla.get("estimate_s"):
        lines.append(
            f"step time, the compiler's estimate (not a measurement): {xla['estimate_s']:.3f} s;"
            f" {facts['steps']} steps ≈ {facts['estimate_hours']:.1f} h of training, validation not included"
        )
    return lines


def _compiled(facts: dict[str, Any]) -> list[str]:
    xla = facts["xla"]
    compiled_for = xla["backend"]
    if "target" in facts:
        compiled_for = f"{facts['target_summary']} by {facts['compiled_by']} on this machine"
    heading = f"compiled for {compiled_for}, {xla['devices']} device(s), not run"
    lines = [f"## the compiler's plan of one step ({heading})", ""]
    if "budget_bytes" in facts:
        lines += _table(facts)
    m, passes, batch = xla["micro_batch"], xla["passes"], facts["volumes_per_step"]
    how = "train.micro_batch: auto" if facts["micro_batch_how"] == "auto" else "train.micro_batch"
    remat_how = "model.remat: auto" if facts["remat_how"] == "auto" else "model.remat"
    lines.append(
        f"chosen: micro-batch {m} volume(s) per device per pass, {passes} pass(es) per step ({how}); "
        f"remat: {'on' if xla['remat'] else 'off'} ({remat_how})"
    )
    lines += _flops(facts)
    if not xla.get("compiled", True):
        lines.append(
            f"total: {_gib(xla['total_bytes'])} per device needed, the compiler said; it did not compile"
        )
        if "budget_bytes" in facts:
            lines.append(
                f"fits {_gib(facts['budget_bytes'])}: no (lower train.batch_size or the micro-batch)"
            )
        return lines
    share = f"state + the step's {batch} volumes"
    if xla["devices"] > 1:
        share = f"state + its {batch // xla['devices']} of the step's {batch} volumes"
    lines += [
        f"arguments: {_gib(xla['argument_bytes'])} per device ({share};"
        f" the {facts['train_cases']} training volumes, {_gib(facts['host_data_bytes'])}, stay on the host)",
        f"temporaries: {_gib(xla['temp_bytes'])} per device (one pass of {m} volume(s):"
        f" {_gib(xla['temp_bytes'] / m)} per volume)",
        f"outputs: {_gib(xla['output_bytes'])} (donated state aliased: {_gib(xla['alias_bytes'])})",
        f"total: {_gib(xla['total_bytes'])} per device",
    ]
    if "budget_bytes" in facts:
        lines.append(
            f"fits {_gib(facts['budget_bytes'])}: "
            + ("yes" if facts["fits"] else "no (set train.micro_batch: auto or lower, model.remat: auto)")
        )
    return lines


def render(facts: dict[str, Any]) -> str:
    """The plan as ``diffseg plan`` prints it."""
    lines = [f"# diffseg plan: {facts['dataset']}/{facts['run']}", "", "## resolved run config", ""]
    lines += yaml.safe_dump(facts["run_config"], sort_keys=False).rstrip().splitlines()
    lines += ["", *_network(facts), "", *_step(facts)]
    if "xla" in facts:
        lines += ["", *_compiled(facts)]
    return "\n".join(lines) + "\n"
