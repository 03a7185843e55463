"""GPUs and TPUs: what a job gets and what a device can hold; each concept once, by platform.

- ``diffseg.accelerators.memory``: the one rule for how much of a device's memory a step may plan
  to use (``micro_batch: auto`` in training and ``diffseg plan`` alike): a GPU's allocator share,
  a TPU's usable HBM, less the platform's headroom.
- ``diffseg.accelerators.slots``: each local train/test job claims its own GPU(s), or TPU chips (a
  box of them, or the whole TPU VM), before JAX starts.
- ``diffseg.accelerators.backend``: which backend and devices a job got, said at its start; a run
  that asks for an accelerator refuses to train without one; a TPU another process holds.
- ``diffseg.accelerators.targets``: known GPU cards (and users' spec files) and TPU slices, for
  compiling a step for hardware this machine does not have (``diffseg plan --target``), with each
  compiler's compile-only devices in ``diffseg.accelerators.cuda`` and ``diffseg.accelerators.tpu``.
"""
