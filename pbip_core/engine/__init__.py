"""Running the method on files: building banks, the stage-1 step and loop, stage 2, pseudo masks, checkpoints, metrics.

Modules: ``bank`` (sec. 3.2 on a dataset folder, bank files), ``build`` (models from a config), ``step`` (one stage-1
step with the memory-capped exact backward), ``stage1`` / ``stage2`` (training loops), ``pseudo`` (pseudo masks of a
split), ``checkpoint`` (safe checkpoints), ``runtime`` (seeds, devices, DDP, schedules), ``metrics``, ``zeroshot``.
"""
