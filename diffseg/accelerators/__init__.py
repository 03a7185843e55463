"""GPUs: what a job gets and what a card can hold.

- ``diffseg.accelerators.memory``: the one rule for how much of a device's memory a step may plan to use
  (``micro_batch: auto`` in training and ``diffseg plan`` alike).
- ``diffseg.accelerators.slots``: each local train/test job claims its own GPU(s), or TPU chips (a box of
  them, or the whole TPU VM), before JAX starts.
- ``diffseg.accelerators.backend``: which backend and devices a job got, said at its start; a run that
  asks for a GPU refuses to train without one.
- ``diffseg.accelerators.targets``: known cards (and users' spec files) for compiling a step for a GPU
  that this machine does not have (``diffseg plan --target``).
"""
