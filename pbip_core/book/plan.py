"""The book's runs in one plan: which runs each chapter reads, the plan that makes them all, its GPU-hour estimate,
and what a chapter says when runs are missing.

:data:`CHAPTER_GRIDS` is the one table of the book grids each chapter reads. The chapters read their runs through
:func:`pbip_core.book.results.run_book_grid` (which refuses a grid that is not in this table, and
``tests/test_plan.py`` checks every notebook's grid names against it), and :func:`book_plan` makes the plan from the
same table, so the plan and the chapters cannot drift apart.

``pbip book --plan [--profile P] [--dataset D] --out plan.yaml`` writes the plan (:func:`write_book_plan`):
``kind: plan``, ``results`` (the chapters' results folder, ``<out_dir>/experiments``), information for people
(profile, dataset, run counts, which chapter reads which grid, the Table-3 rows left out and why, the GPU-hour
estimate) and ``grids``: every grid the chapters read, resolved for the profile and dataset. ``pbip run plan.yaml``
executes every run once (a run shared by several grids, like the ablations' baseline, once); the chapters then only
read the results.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import make_config
from ..data.manifest import dataset_entry, load_manifest
from ..experiments.grid import Grid, RunSpec, load_grid, plan, write_plan
from ..experiments.identity import DATASET_FOLDERS
from ..experiments.runner import done_runs, missing_requirements
from .chapter import BUILTIN_DATASETS, Chapter, repo_root
from .tables import table3_plan

#: The one-run grid of the shared stage-1 run (chapters 03 and 04 show its maps): book-ablation's unchanged variant.
SHARED = "shared"
SHARED_RUN_GRID = "book-ablation"

#: Chapter -> the book grids (``grids/book/<name>.yaml``) it reads; ``shared`` = the shared stage-1 run.
#: Chapters 01, 02 and 08 train nothing (02 builds its bank and 08 scores encoders in the kernel).
CHAPTER_GRIDS: dict[str, tuple[str, ...]] = {
    "03": (SHARED,),
    "04": (SHARED,),
    "05": ("book-table1", SHARED),
    "06": ("book-table1",),
    "07": ("book-table2", "book-table5", "book-table4", "book-fig3", "book-fig4", "book-table3", "book-readings",
           "book-table2-demo-size"),
    "09": ("book-official",),
    "10": ("book-ebhi",),
    "00": ("book-table1", "book-ebhi"),
}

#: Book grids that run on a dataset of their own instead of the book's ``dataset`` parameter: grid -> the manifest's
#: dataset name (its ``local_dir`` in the repository). They enter the plan only when that folder exists.
GRID_DATASETS: dict[str, str] = {"book-ebhi": "ebhi-seg"}

#: Every grid name a chapter may read (``run_book_grid`` refuses others).
BOOK_GRIDS: frozenset[str] = (frozenset(g for gs in CHAPTER_GRIDS.values() for g in gs if g != SHARED)
                               | {SHARED_RUN_GRID})


# ---------------------------------------------------------------------------------------------------- grids
def book_grid(name: str, ch: Chapter, seeds: Sequence[int] | None = None,
              variants: Sequence[str] | None = None) -> Grid:
    """Book grid ``name`` resolved for chapter ``ch``: its profile, dataset (the grid's own, :data:`GRID_DATASETS`,
    else the chapter's) and encoder, and its ``overrides`` (every run); ``seeds`` replaces the profile's seeds,
    ``variants`` keeps only those."""
    ch = on_grid_dataset(ch, name)
    grid = load_grid(name, ch.profile, ch.dataset, ch.encoder, seeds, variants)
    grid.overrides.update(getattr(ch, "overrides", {}) or {})
    return grid


def shared_run_grid(ch: Chapter, seed: int | None = None) -> Grid:
    """The one-run grid of the book's shared stage-1 run: the unchanged variant (no overrides) of
    ``grids/book/book-ablation.yaml`` for the chapter's profile and one seed (default: its first)."""
    grid = book_grid(SHARED_RUN_GRID, ch, seeds=[int(ch.seeds[0] if seed is None else seed)])
    grid.variants = {k: v for k, v in grid.variants.items() if not v}
    return grid


def chapter_grid(name: str, ch: Chapter) -> Grid:
    """The grid ``name`` of :data:`CHAPTER_GRIDS` as the chapter reads it (default seeds; Table 3: the variants whose
    weights are available, :func:`~pbip_core.book.tables.table3_plan`)."""
    if name == SHARED:
        return shared_run_grid(ch)
    if name == "book-table3":
        return book_grid(name, ch, variants=table3_plan(ch)[0])
    return book_grid(name, ch)


@dataclass
class BookPlan:
    """The runs of the chosen chapters: ``grids`` (distinct names), ``chapters`` (chapter -> grid names),
    ``specs`` (every run once, plan order), ``not_runnable`` (Table-3 rows left out, with the reason)."""

    grids: list[Grid]
    chapters: dict[str, list[str]]
    specs: list[RunSpec]
    not_runnable: list[dict[str, str]] = field(default_factory=list)


def dataset_folder(name: str) -> Path:
    """The repository folder of a manifest dataset (``local_dir``, default ``data/<name>``)."""
    return (repo_root() / (dataset_entry(name).get("local_dir") or f"data/{name}")).resolve()


def on_grid_dataset(ch: Chapter, grid: str) -> Chapter:
    """``ch`` on grid ``grid``'s own dataset (:data:`GRID_DATASETS`) where it has one, else ``ch`` itself."""
    name = GRID_DATASETS.get(grid)
    return ch if name is None else dataclasses.replace(ch, dataset=dataset_folder(name), builtin=None)


def book_plan(ch: Chapter, chapters: Sequence[str] | None = None) -> BookPlan:
    """The plan of ``chapters`` (default: every chapter of :data:`CHAPTER_GRIDS`) for chapter set-up ``ch``."""
    wanted = [c for c in (chapters or CHAPTER_GRIDS) if c in CHAPTER_GRIDS]
    grids: dict[str, Grid] = {}
    per_chapter: dict[str, list[str]] = {}
    not_runnable: list[dict[str, str]] = []
    for c in wanted:
        names = []
        for name in CHAPTER_GRIDS[c]:
            if name in GRID_DATASETS and not (on_grid_dataset(ch, name).dataset / "dataset.yaml").is_file():
                data = GRID_DATASETS[name]
                reason = (f"dataset {data} not found in {dataset_entry(data).get('local_dir')}: "
                          f"`pbip data fetch {data}` makes it")
                if not any(r["grid"] == name for r in not_runnable):
                    not_runnable.append({"grid": name, "variant": "*", "reason": reason})
                continue
            grid = chapter_grid(name, ch)
            names.append(grid.name)
            if grid.name in grids:
                continue
            if name == "book-table3":
                _, status = table3_plan(ch)
                not_runnable += [{"grid": grid.name, "variant": str(r["variant"]) or str(row),
                                 "reason": str(r["status"])} for row, r in status.iterrows()
                                if r["status"] != "available"]
            if grid.variants:
                grids[grid.name] = grid
        per_chapter[c] = names
    seen: dict[str, RunSpec] = {}
    for g in grids.values():
        for s in plan(g, quiet=True):
            seen.setdefault(s.hash, s)
    return BookPlan(list(grids.values()), per_chapter, list(seen.values()), not_runnable)


# ---------------------------------------------------------------------------------------------------- GPU hours
#: Cost model of :func:`estimate_gpu_hours`, the paper profile's architectures at 224 px (book/paper-scale.md).
#: GFLOP of one stage-1 step (MiT-B1 + MedCLIP's Swin-T, batch 10, 2 positive classes per image = 20 FG/BG pairs,
#: the exact chunked step), counted by torch's FlopCounterMode in benchmarks/results/stage1_cpu_p2.json; the same
#: file times that step at 5.87 s on the 2-core CPU (132 GFLOP/s effective).
STAGE1_STEP_GFLOP = 776.0
#: GFLOP per image counted the same way (random weights, 224 px): ClassNet forward (validation, pseudo masks),
#: DeepLab-v2 ResNet-101 at output stride 8 forward and forward+backward (stage 2), MedCLIP forward (the bank).
CLASSNET_FWD_GFLOP = 3.2
DEEPLAB_FWD_GFLOP = 68.3
DEEPLAB_TRAIN_GFLOP = 204.7
MEDCLIP_FWD_GFLOP = 8.7
#: Assumed effective rate of one GPU on these small batches (TFLOP/s): about 6 % of an A100's bf16 peak (312);
#: published Swin-T / ResNet-101 training throughputs at batch 256 reach 25-50 TFLOP/s, batches of 10 less.
#: Replace it with a measurement: benchmarks/stage1_step.py --device cuda --amp gives seconds per stage-1 step;
#: STAGE1_STEP_GFLOP / that / 1000 is the rate (`pbip book --plan --gpu-tflops X`).
GPU_TFLOPS = 20.0


def split_sizes(dataset: str | Path) -> dict[str, int] | None:
    """Images per split of a dataset: counted in the folder when it is there, else the manifest's numbers for a
    known dataset (matched by folder name), else the built-in dataset's paper size; None if unknown."""
    root = Path(dataset)
    if root.is_dir():
        count = {rel: sum(1 for p in (root / rel).iterdir() if p.is_file() and not p.name.startswith("."))
                 for rel in DATASET_FOLDERS if (root / rel).is_dir()}
        return {"train": count.get("train", 0), "val": count.get("val/img", 0), "test": count.get("test/img", 0)}
    key = "".join(c for c in root.name.lower() if c.isalnum())
    for name, entry in load_manifest()["datasets"].items():
        if "".join(c for c in name.lower() if c.isalnum()) == key and entry.get("splits"):
            return {k: int(v) for k, v in entry["splits"].items()}
    if root.name in BUILTIN_DATASETS:
        sizes = BUILTIN_DATASETS[root.name][1]["paper"]
        return {"train": sizes["n_train"], "val": sizes["n_val"], "test": sizes["n_test"]}
    return None


def run_gflop(spec: RunSpec, sizes: Mapping[str, int]) -> tuple[float, float]:
    """(stage-1, stage-2) GFLOP of one run of the paper profile's architectures (:data:`STAGE1_STEP_GFLOP` ...),
    scaled by the image size relative to 224 px."""
    cfg = spec.cfg
    n_train = min(sizes["train"], cfg.data.max_train or sizes["train"])
    n_val = min(sizes["val"], cfg.train.max_val or sizes["val"])
    s1_px = (cfg.data.image_size / 224) ** 2
    steps = math.ceil(n_train / cfg.train.batch_size) * cfg.train.epochs
    vals = (cfg.train.epochs // cfg.train.val_every) if cfg.train.val_every else 0
    pseudo = sum(sizes.get(s, 0) for s in spec.splits) + (n_train if spec.stage2 and "train" not in spec.splits else 0)
    s1 = (steps * STAGE1_STEP_GFLOP + (vals * n_val + pseudo) * CLASSNET_FWD_GFLOP) * s1_px
    if not spec.stage2:
        return s1, 0.0
    s2c = cfg.stage2
    s2_px = (s2c.image_size / 224) ** 2
    s2_steps = math.ceil(n_train / s2c.batch_size) * s2c.epochs
    views = 6 if s2c.ms_flip else 1
    s2 = (s2_steps * s2c.batch_size * DEEPLAB_TRAIN_GFLOP
          + (sizes["val"] + sizes["test"]) * views * DEEPLAB_FWD_GFLOP) * s2_px
    return s1, s2


def estimate_gpu_hours(specs: Sequence[RunSpec], sizes: Mapping[str, int] | None,
                       tflops: float = GPU_TFLOPS) -> dict[str, Any] | None:
    """GPU-hours of ``specs`` (one GPU each) at ``tflops`` effective TFLOP/s: stage 1, stage 2, the banks (one per
    distinct bank configuration; every training image encoded once, an upper bound), the total, and the inputs."""
    if not sizes or not specs:
        return None
    s1 = s2 = 0.0
    for spec in specs:
        a, b = run_gflop(spec, sizes)
        s1, s2 = s1 + a, s2 + b
    banks = {str(sorted(vars(s.cfg.bank).items())) for s in specs}
    bank = len(banks) * sizes["train"] * MEDCLIP_FWD_GFLOP
    hours = {k: v / (tflops * 1000) / 3600 for k, v in (("stage1", s1), ("stage2", s2), ("banks", bank))}
    return {"gpu_hours": sum(hours.values()), **{f"{k}_hours": v for k, v in hours.items()},
            "runs": len(specs), "stage2_runs": sum(s.stage2 for s in specs), "banks": len(banks),
            "images": dict(sizes), "gpu_tflops": tflops, "stage1_step_gflop": STAGE1_STEP_GFLOP,
            "how": "GFLOP per step/image (torch FlopCounterMode, benchmarks/) x steps/images of every run "
                   f"/ {tflops:g} TFLOP/s assumed effective per GPU (book/paper-scale.md)"}


# ---------------------------------------------------------------------------------------------------- plan files
def _rel(path: str | Path) -> str:
    """``path`` relative to the working directory when it is below it (plans stay readable and movable)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p)


def plan_command(ch: Chapter, out: str = "plan.yaml") -> str:
    """The ``pbip book --plan`` command that plans the runs chapter ``ch`` reads."""
    parts = ["pbip", "book", "--plan", "--profile", ch.profile, "--dataset", _rel(ch.dataset),
             "--out-dir", _rel(ch.out_dir)]
    if ch.encoder != make_config(ch.profile).bank.encoder:
        parts += ["--encoder", ch.encoder]
    for k, v in (getattr(ch, "overrides", {}) or {}).items():
        parts += ["--set", f"{k}={v}"]
    return shlex.join([*parts, "--out", out])


def write_book_plan(bp: BookPlan, ch: Chapter, path: str | Path, tflops: float = GPU_TFLOPS) -> dict[str, Any]:
    """Write the plan file of :func:`book_plan`; returns its information keys (counts, estimate)."""
    results = Path(ch.out_dir) / "experiments"
    done = done_runs(bp.specs, results)
    meta: dict[str, Any] = {
        "note": "written by `pbip book --plan`; execute it with `pbip run THIS_FILE` (book/paper-scale.md)",
        "profile": ch.profile, "dataset": _rel(ch.dataset), "results": _rel(results),
        "runs": len(bp.specs), "stage2_runs": sum(s.stage2 for s in bp.specs), "done": len(done),
        "chapters": {c: names for c, names in bp.chapters.items()},
        "not_runnable": bp.not_runnable,
    }
    if ch.profile == "paper":
        est = estimate_gpu_hours(bp.specs, split_sizes(ch.dataset), tflops)
        meta["estimate"] = est and {k: round(v, 2) if isinstance(v, float) else v for k, v in est.items()}
    grids = [dataclasses.replace(g, datasets=[_rel(d) for d in g.datasets]) for g in bp.grids]
    write_plan(grids, path, meta)
    return meta


def plan_summary(bp: BookPlan, meta: Mapping[str, Any]) -> str:
    """What ``pbip book --plan`` prints: runs per grid, the total, what is left out, the estimate."""
    lines = [f"plan for profile {meta['profile']} on {meta['dataset']} -> results {meta['results']}"]
    for g in bp.grids:
        specs = plan(g, quiet=True)
        lines.append(f"  {g.name:<15} {len(specs):>4} runs ({len(g.variants)} variants x {len(g.seeds)} seeds"
                     f"{' x ' + str(len(g.methods)) + ' methods' if len(g.methods) > 1 else ''}"
                     f"{', stage 2' if g.stage2 else ''})")
    lines.append(f"  {len(bp.specs)} distinct runs ({meta['stage2_runs']} with stage 2; runs shared by grids count "
                 f"once), {meta['done']} already done")
    if bp.not_runnable:
        weights = sum("weights" in r["reason"] for r in bp.not_runnable)
        data = [r for r in bp.not_runnable if "dataset" in r["reason"]]
        lines.append(f"  left out: {len(bp.not_runnable)} rows ({weights} for weights not available here: make "
                     "the plan where the weights are to include them; the others are listed in not_runnable)")
        lines += [f"  left out: grid {r['grid']}: {r['reason']}" for r in data]
    for m in missing_requirements(bp.specs):
        lines.append(f"  missing here: {m}")
    est = meta.get("estimate")
    if est:
        lines.append(f"  estimate: {est['gpu_hours']:.1f} GPU-hours (stage 1 {est['stage1_hours']:.1f}, stage 2 "
                     f"{est['stage2_hours']:.1f}, banks {est['banks_hours']:.1f}) at {est['gpu_tflops']:g} TFLOP/s "
                     f"effective per GPU, images {est['images']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- missing runs
def missing_message(ch: Chapter, grid: Grid, missing: Sequence[RunSpec], results: str | Path) -> str:
    """What a chapter says when ``missing`` runs of ``grid`` are not in ``results`` and it may not train them."""
    shown = ", ".join(f"{s.method}/{s.variant} seed {s.seed} ({s.hash})" for s in missing[:4])
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    why = (f"the {ch.profile} profile does not train in a notebook" if ch.profile == "paper"
           else "this chapter was asked not to train (train=False)")
    plan_file = f"plan-{ch.profile}.yaml"
    return (f"grid {grid.name}: {len(missing)} of its runs are not in {_rel(results)}: {shown}{more}. Here {why}; "
            f"make every run of the book once (one GPU, a node, or a cluster), then run the chapter again:\n"
            f"  {plan_command(ch, plan_file)}\n"
            f"  pbip run {plan_file}                                   # one GPU (or --jobs N: N GPUs of a node)\n"
            f"  pbip run {plan_file} --executor slurm --partition P    # a Slurm cluster (submitit)\n"
            f"  pbip run {plan_file} --only HASH                       # one run, from any other scheduler")
