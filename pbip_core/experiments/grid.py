"""Grids of experiments: dataset x method x variant x seed, declared in one YAML dialect.

A grid file (``pbip_core/experiments/grids/*.yaml``, the book's in ``grids/book/``)::

    name: table1-demo
    profile: demo                    # optional: the default profile (``pbip run --profile`` overrides it)
    datasets: [data/synth]           # optional for the book's grids: the chapter (or ``--dataset``) gives it
    methods: [pbip, cam]
    variants: {default: {}}          # name -> dict of --set overrides, e.g. {no_bgs: {loss.bgs: false}}
    seeds: [0, 1, 2]
    stage2: true                     # stage 2 (DeepLab-v2) on the train-split pseudo masks
    splits: [val, test]              # pseudo-mask splits scored after stage 1
    overrides: {}                    # --set overrides applied to every run
    extends: other-grid              # optional: start from that grid's keys (this file's win)
    profiles:                        # optional, per profile: the seeds, trims and variants that run there
      demo: {seeds: [0], overrides: {data.max_train: 120}, only: [default]}

Each run resolves ``make_config(profile, {**overrides, "method": m, **variant, "train.seed": s, "data.root": d})``
and is named by a content hash (:func:`run_hash`) of that configuration without its paths and scheduling keys, the
dataset's content identity and the method version (:mod:`pbip_core.experiments.identity`): the same run under
another dataset path, results folder or machine has the same hash. Two grid cells that resolve to the same
configuration are one run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..config import Config, load_yaml, make_config
from ..errors import ConfigError
from ..io import atomic_write_text
from .identity import METHOD_VERSION, dataset_identity

GRIDS_DIR = Path(__file__).with_name("grids")
BOOK_GRIDS_DIR = GRIDS_DIR / "book"
SPLITS = ("train", "val", "test")


@dataclass
class Grid:
    name: str
    profile: str = "demo"
    datasets: list[str] = field(default_factory=lambda: ["data/synth"])
    methods: list[str] = field(default_factory=lambda: ["pbip"])
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    seeds: list[int] = field(default_factory=lambda: [0])
    stage2: bool = False
    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    overrides: dict[str, Any] = field(default_factory=dict)
    config: str | None = None          # optional YAML of config keys applied before the method preset
    source: str | None = None          # file the grid was read from


@dataclass
class RunSpec:
    grid: str
    dataset: str
    method: str
    variant: str
    seed: int
    overrides: dict[str, Any]
    cfg: Config
    hash: str
    stage2: bool
    splits: list[str]
    aliases: list[str] = field(default_factory=list)   # other method/variant labels with the identical config
    dataset_id: str = ""                               # the dataset's identity key, name@digest (identity.py)

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.method}/{self.variant} seed={self.seed}"


# ---------------------------------------------------------------------------------------------------- reading
def grid_path(name: str | Path) -> Path:
    """A grid file: the path itself, or a built-in grid's name (``grids/<name>.yaml`` or ``grids/book/<name>.yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    for folder in (GRIDS_DIR, BOOK_GRIDS_DIR):
        if (folder / f"{p.name}.yaml").is_file():
            return folder / f"{p.name}.yaml"
    known = ", ".join(sorted(q.stem for q in (*GRIDS_DIR.glob("*.yaml"), *BOOK_GRIDS_DIR.glob("*.yaml"))))
    raise ConfigError(f"{p}: grid file not found (built-in grids: {known})")


def read_grid(name: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a grid file with its ``extends`` chain merged (this file's keys win; ``profiles`` are merged
    per profile and per key). ``name`` is a path or a built-in grid's name."""
    path = grid_path(name)
    if path.stem in _seen:
        raise ConfigError(f"{path}: 'extends' cycle {' -> '.join((*_seen, path.stem))}")
    data = load_yaml(path, "a grid is a mapping with keys name, methods, variants, seeds, ...", "grid file")
    data.setdefault("name", path.stem)
    data["source"] = str(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    base = read_grid(str(base_name) if Path(str(base_name)).is_file() else Path(str(base_name)).name,
                     (*_seen, path.stem))
    merged = {**base, **{k: v for k, v in data.items() if k != "profiles"}}
    profiles = copy.deepcopy(base.get("profiles") or {})
    for prof, block in (data.get("profiles") or {}).items():
        profiles[prof] = {**profiles.get(prof, {}), **(block or {})}
    merged["profiles"] = profiles
    return merged


def resolve(data: Mapping[str, Any], profile: str | None = None, dataset: str | Path | None = None,
            encoder: str | None = None, seeds: Sequence[int] | None = None,
            variants: Sequence[str] | None = None) -> dict[str, Any]:
    """A grid mapping for one profile: the ``profiles.<profile>`` block applied (its ``overrides`` added to the grid's,
    ``only`` keeps those variants, ``seeds`` replace the grid's), then the arguments: ``dataset`` replaces
    ``datasets``, ``encoder`` sets ``bank.encoder`` for every run, ``seeds`` and ``variants`` (names) select."""
    data = dict(data)
    name = data.get("name", "?")
    profile = profile or data.get("profile") or "demo"
    block = dict((data.pop("profiles", None) or {}).get(profile) or {})
    unknown = set(block) - {"seeds", "overrides", "only"}
    if unknown:
        raise ConfigError(f"grid {name}: unknown keys {sorted(unknown)} in profiles.{profile}")
    raw_variants = data.get("variants", {"default": {}})
    if isinstance(raw_variants, list):                 # [a, b] -> {a: {}, b: {}}
        raw_variants = {str(v): {} for v in raw_variants}
    if not isinstance(raw_variants, Mapping) or not all(isinstance(v, Mapping) or v is None
                                                       for v in raw_variants.values()):
        raise ConfigError(f"{data.get('source') or name}: variants must map a name to a dict of config overrides")
    vs = {str(k): dict(v or {}) for k, v in raw_variants.items()}
    for keep, where in ((block.get("only"), f"profiles.{profile}.only"), (variants, "the selection")):
        if keep is not None:
            missing = [v for v in keep if str(v) not in vs]
            if missing:
                raise ConfigError(f"grid {name}: {where} names unknown variants {missing}")
            vs = {k: v for k, v in vs.items() if k in set(map(str, keep))}
    overrides = {**(data.get("overrides") or {}), **(block.get("overrides") or {})}
    if encoder:
        overrides["bank.encoder"] = str(encoder)
    data.update(profile=profile, variants=vs, overrides=overrides)
    data["seeds"] = block.get("seeds", data.get("seeds", [0]))
    if seeds is not None:
        data["seeds"] = list(seeds)
    if dataset is not None:
        data["datasets"] = [str(dataset)]
    return data


def load_grid(grid: str | Path | Mapping[str, Any], profile: str | None = None, dataset: str | Path | None = None,
              encoder: str | None = None, seeds: Sequence[int] | None = None,
              variants: Sequence[str] | None = None) -> Grid:
    """A :class:`Grid` from a YAML file, a built-in grid's name or a mapping, resolved for ``profile`` (default: the
    grid's own) with the selections of :func:`resolve`."""
    data = read_grid(grid) if not isinstance(grid, Mapping) else dict(grid)
    data = resolve(data, profile, dataset, encoder, seeds, variants)
    where = data.get("source") or "grid"
    known_keys = {f.name for f in dataclasses.fields(Grid)}
    unknown = set(data) - known_keys
    if unknown:
        raise ConfigError(f"{where}: unknown grid keys {sorted(unknown)}; allowed: {sorted(known_keys - {'source'})}"
                          " and extends, profiles")
    if "name" not in data:
        raise ConfigError(f"{where}: the grid needs a name")
    for key in ("datasets", "methods", "seeds", "splits"):
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    data["seeds"] = [int(s) for s in data.get("seeds", [0])]
    grid_obj = Grid(**data)
    for split in grid_obj.splits:
        if split not in SPLITS:
            raise ConfigError(f"{where}: split {split!r} must be train, val or test")
    return grid_obj


def grid_dict(grid: Grid) -> dict[str, Any]:
    """A resolved grid as a plain mapping (what :func:`write_grid` writes and :func:`load_grid` reads back)."""
    keys = ("name", "profile", "datasets", "methods", "variants", "seeds", "stage2", "splits", "overrides")
    data = {k: copy.deepcopy(getattr(grid, k)) for k in keys}
    data["variants"] = {k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                        for k, v in data["variants"].items()}
    data["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["overrides"].items()}
    if grid.config:
        data["config"] = grid.config
    return data


def write_grid(grid: Grid, path: str | Path) -> Path:
    """Save a resolved grid as a plain YAML file that ``pbip run`` reads back to the same runs."""
    atomic_write_text(path, yaml.safe_dump(grid_dict(grid), sort_keys=False, allow_unicode=True))
    return Path(path)


# ---------------------------------------------------------------------------------------------------- plans
PLAN_KIND = "plan"


def write_plan(grids: Sequence[Grid], path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Save a plan: ``kind: plan``, the keys of ``meta`` (``results``: the results folder ``pbip run`` uses by
    default; anything else is information for people) and ``grids``, a list of resolved grids. ``pbip run PLAN``
    executes every run of every grid once (runs shared by several grids once)."""
    names = [g.name for g in grids]
    if len(set(names)) != len(names):
        raise ConfigError(f"a plan's grids need distinct names; got {names}")
    data = {"kind": PLAN_KIND, **dict(meta or {}), "grids": [grid_dict(g) for g in grids]}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120))
    return Path(path)


def load_grids(source: str | Path, profile: str | None = None, dataset: str | Path | None = None
               ) -> tuple[list[Grid], dict[str, Any]]:
    """The grids of a plan file (``kind: plan``), or the one grid of a grid file / built-in grid name, and the
    plan's other keys (``{}`` for a grid). ``dataset`` replaces every grid's datasets; a plan is already resolved
    for its profile, so ``profile`` must be None or the plan's."""
    path = Path(source)
    data = load_yaml(path, "a plan is a mapping with kind: plan and grids", "plan file") if path.is_file() else {}
    if data.get("kind") != PLAN_KIND:
        return [load_grid(source, profile=profile, dataset=dataset)], {}
    raw = data.get("grids")
    if not isinstance(raw, list) or not all(isinstance(g, Mapping) for g in raw):
        raise ConfigError(f"{path}: a plan's 'grids' is a list of grid mappings")
    meta = {k: v for k, v in data.items() if k not in ("kind", "grids")}
    plan_profile = meta.get("profile")
    if profile is not None and plan_profile is not None and profile != plan_profile:
        raise ConfigError(f"{path}: the plan is for profile {plan_profile}; --profile {profile} does not apply "
                          f"(make a plan for it: pbip book --plan --profile {profile})")
    grids = [load_grid({**g, "source": f"{path} grid {g.get('name', i)}"}, dataset=dataset)
             for i, g in enumerate(raw)]
    names = [g.name for g in grids]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: a plan's grids need distinct names; got {names}")
    return grids, meta


# ---------------------------------------------------------------------------------------------------- runs
def run_hash(cfg: Config, dataset_key: str, stage2: bool, splits: Sequence[str]) -> str:
    """Content hash of a run: the config hash (no paths, no scheduling keys), the dataset's identity key
    (:attr:`~pbip_core.experiments.identity.DatasetIdentity.key`), the stage flags and the method version."""
    blob = json.dumps({"config": cfg.hash(), "dataset": str(dataset_key), "stage2": bool(stage2),
                       "splits": sorted(splits), "method_version": METHOD_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan(grid: Grid, quiet: bool = False) -> list[RunSpec]:
    """Every run of the grid, in dataset -> method -> variant -> seed order.

    Two grid cells that resolve to the same configuration (e.g. method ``cam``, which already switches the
    similarity losses off, with a variant ``{loss.bgs: false}``) are one run: the later one is recorded in the
    first one's ``aliases`` (and the table's ``aliases`` column) instead of being run twice.
    """
    specs: list[RunSpec] = []
    by_hash: dict[str, RunSpec] = {}
    for dataset, method, (vname, variant), seed in itertools.product(
            grid.datasets, grid.methods, grid.variants.items(), grid.seeds):
        overrides = {**grid.overrides, "method": method, **variant, "train.seed": int(seed), "data.root": dataset}
        if "stage2.seed" not in variant and "stage2.seed" not in grid.overrides:
            overrides["stage2.seed"] = int(seed)
        cfg = make_config(grid.profile, overrides, grid.config)
        ident = dataset_identity(dataset).key
        h = run_hash(cfg, ident, grid.stage2, grid.splits)
        if h in by_hash:
            first = by_hash[h]
            first.aliases.append(f"{method}/{vname}")
            if not quiet:
                # information, not a problem: stdout, so notebooks show no stderr block for it
                print(f"pbip run: note: {method}/{vname} seed={seed} on {dataset} has the same configuration as "
                      f"{first.method}/{first.variant} ({h}); it is run once")
            continue
        spec = RunSpec(grid=grid.name, dataset=dataset, method=method, variant=vname, seed=int(seed),
                       overrides=overrides, cfg=cfg, hash=h, stage2=grid.stage2, splits=list(grid.splits),
                       dataset_id=ident)
        by_hash[h] = spec
        specs.append(spec)
    return specs
