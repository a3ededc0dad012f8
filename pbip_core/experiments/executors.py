"""Where the runs of a grid or plan execute: this process, local worker processes, or a scheduler via submitit.

An executor gets the pending runs and a picklable ``work(spec) -> row`` (the runner's ``execute`` bound to the
results folder); every run writes its own ``runs/<hash>/row.json``, so executors share no file and need no lock.
The runner collects the rows into ``RESULTS/<grid>.csv`` afterwards.

* ``local`` (:func:`run_local`): ``jobs`` processes at once (spawn), each with ``cores // jobs`` torch threads and,
  on a machine with GPUs, one GPU of its own (``CUDA_VISIBLE_DEVICES``, round-robin). Default ``jobs``: one per
  visible GPU, else 1 (then the runs execute in this process, one after another).
* ``slurm`` (:func:`run_submitit`): one job-array task per run through `submitit`_ (``AutoExecutor``): partition, time
  limit, GPUs/CPUs/memory per run, array parallelism, setup lines. Each task is a :class:`RunTask`
  (``submitit.helpers.Checkpointable``): on preemption or time-out submitit requeues it and the run resumes from its
  ``last.pt`` checkpoints. ``cluster="local"`` / ``"debug"`` are submitit's own local and in-process executors, for
  tests and CI without Slurm.
* any other scheduler: ``pbip run PLAN --hashes`` lists the pending runs, ``pbip run PLAN --only HASH`` runs one
  (e.g. one array task each), ``pbip run PLAN --collect`` gathers the rows.

.. _submitit: https://github.com/facebookincubator/submitit
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import submitit
import torch

from ..errors import ConfigError

EXECUTORS = ("local", "slurm")
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")
Work = Callable[[Any], Mapping[str, Any]]


def _say(text: str) -> None:
    print(f"pbip run: {text}", flush=True)


def _done_line(n: int, total: int, spec: Any, row: Mapping[str, Any]) -> str:
    return f"[{n}/{total}] {spec.label} ({spec.hash}): {row.get('status')} in {row.get('wall_time_s')} s"


# ---------------------------------------------------------------------------------------------------- local
def default_jobs() -> int:
    """One job per visible GPU; 1 on a machine without GPUs."""
    return max(1, torch.cuda.device_count())


def _init_worker(counter: Any, n_gpus: int, threads: int) -> None:
    with counter.get_lock():
        idx = counter.value
        counter.value += 1
    if n_gpus > 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(idx % n_gpus)  # round-robin, before CUDA is touched
    torch.set_num_threads(max(1, threads))


def run_local(specs: Sequence[Any], work: Work, jobs: int | None = None) -> list[Mapping[str, Any]]:
    """Run ``specs`` with ``jobs`` processes (default :func:`default_jobs`); returns their rows as they finish.
    ``jobs == 1`` (or a single run) executes in this process, in order."""
    jobs = default_jobs() if jobs is None else int(jobs)
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: need at least 1")
    rows = []
    if jobs == 1 or len(specs) <= 1:
        for i, spec in enumerate(specs, 1):
            _say(f"[{i}/{len(specs)}] {spec.label} ({spec.hash})")
            row = work(spec)
            rows.append(row)
            _say(_done_line(i, len(specs), spec, row))
        return rows
    n_gpus = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    _say(f"{len(specs)} runs on {jobs} local processes ({threads} threads each"
         + (f", {n_gpus} GPUs round-robin)" if n_gpus else ", no GPU)"))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, n_gpus, threads)) as pool:
        futures = {pool.submit(work, spec): spec for spec in specs}
        for n, fut in enumerate(as_completed(futures), 1):
            row = fut.result()
            rows.append(row)
            _say(_done_line(n, len(specs), futures[fut], row))
    return rows


# ---------------------------------------------------------------------------------------------------- submitit
@dataclass
class SlurmOptions:
    """What ``pbip run --executor slurm`` asks the scheduler for, per run (one array task = one run)."""

    cluster: str = "slurm"                 # submitit executor: slurm | local (subprocesses) | debug (in process)
    folder: str | None = None              # submitit's job files and logs (default: RESULTS/submitit)
    partition: str | None = None
    time_min: int = 720                    # time limit of one task; a run that needs longer resumes after requeue
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    mem_gb: float | None = None
    array_parallelism: int = 64            # tasks of the array running at once
    max_requeue: int = 3                   # requeues after a time-out (preemptions are requeued without limit)
    setup: list[str] = field(default_factory=list)           # shell lines run before each task (module load ...)
    extra: dict[str, Any] = field(default_factory=dict)      # more sbatch options, e.g. {"account": "lab"}
    wait: bool = True                      # wait for the tasks (False: submit, print the job ids, return)


def _reason(err: BaseException) -> str:
    """The exception line of a failed task's trace (submitit wraps it in a long message), else its first line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    named = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception", "Interrupt", "Exit"))]
    return named[-1] if named else (lines[0] if lines else type(err).__name__)


class RunTask(submitit.helpers.Checkpointable):
    """One run as a submitit task. ``Checkpointable``: when Slurm preempts the task or its time runs out, submitit
    requeues the same call, and the run resumes from the ``last.pt`` of its stages."""

    def __init__(self, work: Work):
        self.work = work

    def __call__(self, spec: Any) -> Mapping[str, Any]:
        return self.work(spec)


def make_submitit_executor(opts: SlurmOptions, folder: Path, n_runs: int) -> Any:
    """A configured ``submitit.AutoExecutor`` for ``opts`` (job files in ``folder``)."""
    if opts.cluster not in SUBMITIT_CLUSTERS:
        raise ConfigError(f"submitit cluster {opts.cluster!r}: choose one of {', '.join(SUBMITIT_CLUSTERS)}")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=opts.cluster, slurm_max_num_timeout=opts.max_requeue)
    gpus = opts.gpus_per_run
    if opts.cluster != "slurm":
        gpus = min(gpus, torch.cuda.device_count())        # submitit's local executor pins GPUs that must exist
    params: dict[str, Any] = {"name": "pbip-run", "timeout_min": int(opts.time_min), "gpus_per_node": gpus,
                              "cpus_per_task": int(opts.cpus_per_run), "tasks_per_node": 1, "nodes": 1,
                              "slurm_array_parallelism": int(min(opts.array_parallelism, max(1, n_runs)))}
    if opts.mem_gb:
        params["mem_gb"] = float(opts.mem_gb)
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.setup:
        params["slurm_setup"] = list(opts.setup)
    if opts.extra:
        params["slurm_additional_parameters"] = dict(opts.extra)
    ex.update_parameters(**params)
    return ex


def run_submitit(specs: Sequence[Any], work: Work, results_dir: str | Path, opts: SlurmOptions | None = None,
                 jobs: int | None = None) -> list[Mapping[str, Any]]:
    """Submit one array task per run and (``opts.wait``) wait for them; returns the rows of the finished tasks.

    With submitit's ``local`` cluster (tests, a workstation) the tasks are started ``jobs`` at a time (default 1):
    its local executor has no array throttle of its own. A task that crashed (killed, out of memory) is reported and
    left pending; a run that failed inside is recorded as failed in its row, as with every executor.
    """
    opts = opts or SlurmOptions()
    if not specs:
        return []
    folder = Path(opts.folder) if opts.folder else Path(results_dir) / "submitit"
    ex = make_submitit_executor(opts, folder / "%j", len(specs))
    task = RunTask(work)
    waves = [list(specs)]
    if opts.cluster == "local":
        size = max(1, int(jobs or 1))
        waves = [list(specs[i:i + size]) for i in range(0, len(specs), size)]
    rows: list[Mapping[str, Any]] = []
    n = 0
    for wave in waves:
        submitted = ex.map_array(task, wave)
        _say(f"submitted {len(submitted)} run(s) to submitit ({opts.cluster}): job "
             f"{submitted[0].job_id.split('_')[0]}; logs in {folder}")
        if not opts.wait:
            for job, spec in zip(submitted, wave):
                _say(f"  {job.job_id}: {spec.label} ({spec.hash})")
            continue
        by_job = {id(job): spec for job, spec in zip(submitted, wave)}
        for job in submitit.helpers.as_completed(submitted):
            n += 1
            spec = by_job[id(job)]
            try:
                row = job.result()
            except Exception as e:  # noqa: BLE001 - a crashed task: report it, the run stays pending
                print(f"pbip run: [{n}/{len(specs)}] {spec.label} ({spec.hash}): task {job.job_id} crashed: "
                      f"{_reason(e)} (log: {job.paths.stderr})", file=sys.stderr)
                continue
            rows.append(row)
            _say(_done_line(n, len(specs), spec, row))
    if not opts.wait:
        _say("not waiting; when the tasks are done: pbip run PLAN --collect (same --results)")
    return rows
