"""Paper scale: portable run identity, per-run result files, plans, executors (local, submitit), the book's plan.

The real pipeline is exercised in the slow tests at the end (a smoke plan through submitit's local executor) and in
tests/test_paper_path.py; the rest uses a fake step, so each test runs in seconds.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import submitit
import torch

from _book_support import fresh_book_copy
from conftest import make_dataset
from pbip_core.book import plan as BP
from pbip_core.book import results as R
from pbip_core.book.build import CHAPTERS
from pbip_core.book.chapter import chapter_setup
from pbip_core.cli import main
from pbip_core.config import make_config
from pbip_core.engine.runtime import device_for, equal_shard
from pbip_core.errors import ConfigError, MissingRunsError, PBIPError
from pbip_core.experiments import executors as EX
from pbip_core.experiments import grid as G
from pbip_core.experiments import identity as ID
from pbip_core.experiments import runner as ex

ROOT = Path(__file__).resolve().parents[1]


class CountingStep:
    """A fake pipeline step: records the hashes it ran, returns a metric per seed."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, spec, run_dir):
        self.calls.append(spec.hash)
        return {"stage1.val.miou": 0.5 + 0.01 * spec.seed}


def _grid(dataset, **kw):
    d = {"name": "g", "profile": "smoke", "datasets": [str(dataset)], "methods": ["pbip", "cam"],
         "seeds": [0, 1], "stage2": False, "splits": ["val"]}
    d.update(kw)
    return G.load_grid(d)


# ---------------------------------------------------------------------------------------------------- identity
def test_dataset_identity_is_content_not_path(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=4, n_val=1, n_test=1)
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    ia, ib = ID.dataset_identity(a), ID.dataset_identity(b)
    assert ia.found and ia.key == ib.key and ia.name == "toy" and ia.n_files == 4 + 2 + 2
    # relative and absolute spellings of one folder
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert ID.dataset_identity("a/toy").key == ia.key
    finally:
        os.chdir(old)
    # a new file, a renamed file, a resized file, another dataset.yaml: another dataset
    first = sorted((b / "train").iterdir())[0]
    shutil.copy(first, b / "train" / "extra-[1 0 0 0].png")
    added = ID.dataset_identity(b)
    assert added.key != ia.key and added.n_files == ia.n_files + 1
    (b / "train" / "extra-[1 0 0 0].png").unlink()
    assert ID.dataset_identity(b).key == ia.key
    first.rename(first.with_name("renamed-[1 0 0 0].png"))
    assert ID.dataset_identity(b).key != ia.key
    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / "dataset.yaml").write_text((c / "dataset.yaml").read_text() + "\n# edited\n")
    assert ID.dataset_identity(c).key != ia.key
    d = tmp_path / "d"
    shutil.copytree(a, d)
    mask = sorted((d / "val" / "mask").iterdir())[0]
    mask.write_bytes(mask.read_bytes() + b"\0")
    assert ID.dataset_identity(d).key != ia.key
    # a folder that is not there: its name, no digest
    missing = ID.dataset_identity(tmp_path / "nope" / "bcss-wsss")
    assert not missing.found and missing.key == "bcss-wsss@missing"


def test_code_digest_ignores_docstrings_and_comments(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""doc"""\n\ndef f(x):\n    """doc"""\n    return x + 1  # one\n')
    base = ID.source_digest(f)
    f.write_text('"""other doc"""\n# a comment\n\ndef f(x):\n    """another"""\n\n    return x + 1\n')
    assert ID.source_digest(f) == base
    f.write_text('def f(x):\n    return x + 2\n')
    assert ID.source_digest(f) != base
    assert re.fullmatch(r"[0-9a-f]{16}", ID.code_digest())


def test_hash_leaves_out_paths_and_scheduling_keys():
    cfg = make_config("smoke")
    same = make_config("smoke", {"data.root": "/somewhere/else", "train.device": "cuda:3", "data.num_workers": 7,
                                 "train.allow_cpu": True, "train.dist_timeout_min": 5})
    assert cfg.hash() == same.hash()
    for key, value in (("train.amp", "bf16"), ("bank.random_init", True), ("train.lr", 0.5)):
        assert make_config("smoke", {key: value}).hash() != cfg.hash(), key
    assert G.run_hash(cfg, "toy@1", False, ["val"]) != G.run_hash(cfg, "toy@2", False, ["val"])


def test_same_data_under_two_paths_and_moved_results_train_once(tmp_path, monkeypatch):
    a = make_dataset(tmp_path / "disk1", n_train=4, n_val=1, n_test=1)
    b = tmp_path / "disk2" / "toy"
    shutil.copytree(a, b)
    results = tmp_path / "results"
    step = CountingStep()
    df = ex.run_grid(_grid(a), results, step=step)
    assert len(step.calls) == 4 and (df["status"] == "ok").all()
    # the same dataset under another absolute path, and as a relative path: every run reused
    again = CountingStep()
    df_b = ex.run_grid(_grid(b), results, step=again)
    monkeypatch.chdir(tmp_path)
    ex.run_grid(_grid("disk1/toy"), "results", step=again)
    assert again.calls == [] and len(df_b) == 4 and set(df_b["hash"]) == set(df["hash"])
    assert (df_b["dataset"] == str(b)).all()                # the table says which path this grid used
    # the results folder moved to another place (another machine): reused, and the tables are rebuilt there
    moved = tmp_path / "other-machine" / "res"
    shutil.move(str(results), moved)
    (moved / "g.csv").unlink()
    df_m = ex.run_grid(_grid(b), moved, step=again)
    assert again.calls == [] and len(df_m) == 4 and (moved / "g.csv").is_file()
    row = json.loads((moved / "runs" / df_m["hash"][0] / "row.json").read_text())
    assert row["status"] == "ok" and row["dataset_id"] == ID.dataset_identity(a).key and row["code"]


def test_stale_code_is_reported_and_rerun_on_request(tmp_path, capsys):
    g = _grid(tmp_path / "ds", methods=["pbip"], seeds=[0])
    results = tmp_path / "results"
    ex.run_grid(g, results, step=CountingStep())
    h = G.plan(g)[0].hash
    p = ex.row_path(results, h)
    row = json.loads(p.read_text())
    p.write_text(json.dumps({**row, "code": "0" * 16}))
    step = CountingStep()
    ex.run_grid(g, results, step=step)
    assert step.calls == [] and "computed by other code" in capsys.readouterr().out
    ex.run_grid(g, results, step=step, rerun_stale=True)
    assert step.calls == [h]
    assert json.loads(p.read_text())["code"] == ID.code_digest()


# ---------------------------------------------------------------------------------------------------- plans
def _two_grids(ds):
    a = _grid(ds, name="a", methods=["pbip"], seeds=[0, 1])
    b = _grid(ds, name="b", methods=["pbip"], seeds=[1, 2], variants={"same": {}, "k1": {"bank.k": 1}})
    return a, b


def test_plan_file_runs_shared_runs_once_and_tables_per_grid(tmp_path, capsys):
    a, b = _two_grids(tmp_path / "ds")
    path = G.write_plan([a, b], tmp_path / "plan.yaml", {"results": str(tmp_path / "res"), "profile": "smoke"})
    grids, meta = G.load_grids(path)
    assert [g.name for g in grids] == ["a", "b"] and meta["results"] == str(tmp_path / "res")
    with pytest.raises(ConfigError, match="plan is for profile smoke"):
        G.load_grids(path, profile="demo")
    step = CountingStep()
    frames = ex.run_grids(grids, meta["results"], step=step)
    # a: seeds 0, 1; b: seeds 1, 2 x 2 variants; seed 1 of variant "same" is a's seed 1: 2 + 4 - 1 runs
    assert len(step.calls) == 5 and len(set(step.calls)) == 5
    fa, fb = frames["a"], frames["b"]
    assert len(fa) == 2 and len(fb) == 4
    shared = set(fa["hash"]) & set(fb["hash"])
    assert len(shared) == 1
    assert fb.set_index("hash").loc[list(shared)[0], "variant"] == "same"   # b's own label for the shared run
    assert (pd.read_csv(tmp_path / "res" / "b.csv")["grid"] == "b").all()
    # the command line: --hashes lists nothing pending, --collect rebuilds the tables, --dry-run marks all done
    (tmp_path / "res" / "a.csv").unlink()
    capsys.readouterr()
    assert main(["run", str(path), "--hashes"]) == 0
    assert capsys.readouterr().out.strip() == ""
    assert main(["run", str(path), "--collect"]) == 0
    assert "a: 2 of 2 runs done" in capsys.readouterr().out and (tmp_path / "res" / "a.csv").is_file()
    assert main(["run", str(path), "--dry-run", "--allow-missing"]) == 0
    assert "pending" not in capsys.readouterr().out
    # pbip report collects a plan's tables itself
    (tmp_path / "res" / "b.csv").unlink()
    assert main(["report", str(path), "--metrics", "stage1.val.miou"]) == 0
    assert "same" in capsys.readouterr().out and (tmp_path / "res" / "b.csv").is_file()


def test_only_runs_one_run_and_names_unknown_hashes(tmp_path, capsys):
    a, b = _two_grids(tmp_path / "ds")
    pending = ex.pending_runs([a, b], tmp_path / "res")
    assert len(pending) == 5
    step = CountingStep()
    row = ex.run_only([a, b], pending[2].hash[:8], tmp_path / "res", step=step)
    assert step.calls == [pending[2].hash] and row["status"] == "ok"
    assert not (tmp_path / "res" / "a.csv").exists()            # --only writes its row, nothing shared
    assert ex.read_row(tmp_path / "res", pending[2].hash)["status"] == "ok"
    assert len(ex.pending_runs([a, b], tmp_path / "res")) == 4
    with pytest.raises(ConfigError, match="no run of the plan"):
        ex.run_only([a, b], "ffffffffffffffff", tmp_path / "res", step=step)


# ---------------------------------------------------------------------------------------------------- executors
def _subprocess_step(spec, run_dir):
    return {"stage1.val.miou": 0.1 * spec.seed, "pid": os.getpid()}


def _tests_on_path(monkeypatch):
    """Task processes unpickle the fake steps of this module: put tests/ on their PYTHONPATH."""
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


def test_submitit_debug_and_local_executors_fill_the_tables(tmp_path, monkeypatch):
    _tests_on_path(monkeypatch)
    g = _grid(tmp_path / "ds", methods=["pbip"], seeds=[0, 1, 2])
    debug = ex.run_grid(g, tmp_path / "r1", executor="slurm", slurm=EX.SlurmOptions(cluster="debug"),
                        step=CountingStep())
    assert len(debug) == 3 and (debug["status"] == "ok").all()
    local = ex.run_grid(g, tmp_path / "r2", executor="slurm", jobs=2,
                        slurm=EX.SlurmOptions(cluster="local", time_min=10), step=_subprocess_step)
    assert len(local) == 3 and (local["status"] == "ok").all()
    assert sorted(local["stage1.val.miou"]) == pytest.approx([0.0, 0.1, 0.2])
    assert os.getpid() not in set(local["pid"])                      # each run in a task process
    assert list((tmp_path / "r2" / "submitit").iterdir()), "submitit's job folders"


def _preemptible_step(spec, run_dir):
    """First call: mark, then work past the task's time limit. After the requeue: finish (a run resumes from last.pt)."""
    marks = run_dir / "calls.txt"
    n = len(marks.read_text().splitlines()) if marks.is_file() else 0
    marks.write_text("call\n" * (n + 1))
    if n == 0:
        time.sleep(600)
    return {"calls": n + 1}


@pytest.mark.slow
def test_a_task_cut_off_by_its_time_limit_is_requeued_and_resumes(tmp_path, monkeypatch):
    """What Slurm does before a time limit or a preemption (SIGUSR2, here from submitit's local controller 60 s into
    the task): RunTask is Checkpointable, so submitit requeues the same run, which finishes the second time."""
    _tests_on_path(monkeypatch)
    g = _grid(tmp_path / "ds", methods=["pbip"], seeds=[0])
    spec, = G.plan(g)
    results = tmp_path / "res"
    work = functools.partial(ex.execute, results_dir=results, step=_preemptible_step)
    executor = submitit.LocalExecutor(tmp_path / "jobs" / "%j", max_num_timeout=2)
    executor.update_parameters(timeout_min=2, signal_delay_s=60)
    job = executor.submit(EX.RunTask(work), spec)
    row = job.result()
    assert row["status"] == "ok" and row["calls"] == 2
    assert ex.read_row(results, spec.hash)["calls"] == 2
    assert "Requeued job" in job.stdout() + (job.stderr() or "")


def test_local_executor_default_jobs_and_bad_values(tmp_path):
    assert EX.default_jobs() == max(1, torch.cuda.device_count())
    with pytest.raises(ConfigError, match="at least 1"):
        EX.run_local([G.plan(_grid(tmp_path / "ds"))[0]], lambda s: {}, jobs=0)
    with pytest.raises(ConfigError, match="executor"):
        ex.run_grids([_grid(tmp_path / "ds")], tmp_path / "r", executor="pbs", step=CountingStep())


# ---------------------------------------------------------------------------------------------------- runtime
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_shard_gives_every_rank_the_same_length(n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [equal_shard(order, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert set(torch.cat(shards).tolist()) == set(order.tolist())      # every sample seen
    assert sum(len(s) for s in shards) == (n + (-n) % world if world > 1 else n)


def test_paper_profile_refuses_the_cpu_unless_allowed():
    cfg = make_config("paper")
    with pytest.raises(PBIPError, match="train.allow_cpu=true"):
        device_for(cfg, "cpu")
    assert device_for(make_config("paper", {"train.allow_cpu": True}), "cpu") == "cpu"
    assert device_for(make_config("demo"), "cpu") == "cpu"
    assert make_config("paper").data.num_workers > 0 and make_config("paper").train.amp == "bf16"


def test_amp_values_and_older_configs():
    assert [make_config("demo", [f"train.amp={v}"]).train.amp for v in ("bf16", "fp16", "off", "true", "false")] == \
        ["bf16", "fp16", "off", "bf16", "off"]
    with pytest.raises(ConfigError, match="bf16|fp16|off"):
        make_config("demo", ["train.amp=fp8"])


# ---------------------------------------------------------------------------------------------------- the book
def _notebook_grids(chapter: str) -> set[str]:
    nb = nbformat.read(ROOT / "book" / CHAPTERS[chapter][0], as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    names = set(re.findall(r"(?:run_book_grid|grid_if_available)\(\s*\"([^\"]+)\"", code))
    if "headline_runs(" in code:
        names |= set(R.HEADLINE_GRIDS.values())
    if "stage1_run(" in code:
        names.add(BP.SHARED)
    return names


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_chapters_read_exactly_the_grids_of_the_plan_table(chapter):
    """The plan and the chapters cannot drift: each notebook reads the grids CHAPTER_GRIDS lists for it."""
    assert _notebook_grids(chapter) == set(BP.CHAPTER_GRIDS.get(chapter, ()))


def test_run_book_grid_refuses_grids_outside_the_table(tmp_path):
    ch = chapter_setup("smoke", str(make_dataset(tmp_path, n_train=4)), out_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="CHAPTER_GRIDS"):
        R.run_book_grid("table1-demo", ch)


def test_paper_chapters_say_which_runs_are_missing_and_train_nothing(tmp_path):
    data = make_dataset(tmp_path, n_train=4, n_val=1, n_test=1)
    ch = chapter_setup("paper", str(data), out_dir=str(tmp_path / "out"), device="cpu")
    assert ch.train is False
    with pytest.raises(MissingRunsError) as err:
        R.run_book_grid("book-table1", ch)
    msg = str(err.value)
    assert "15 of its runs are not in" in msg and "pbip book --plan --profile paper" in msg
    assert "pbip run plan-paper.yaml --executor slurm" in msg and "--only HASH" in msg
    with pytest.raises(MissingRunsError):
        R.stage1_run(ch)
    assert not (tmp_path / "out" / "experiments" / "runs").exists(), "nothing was trained"
    with pytest.raises(ConfigError, match="does not train in a notebook"):
        chapter_setup("paper", str(data), out_dir=str(tmp_path / "out"), train=True)
    with pytest.raises(PBIPError, match="allow_cpu"):
        ch.compute_device                                                   # noqa: B018


def test_book_plan_counts_and_reads_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path, n_train=4, n_val=1, n_test=1)
    assert main(["book", "--plan", "--profile", "paper", "--dataset", str(data), "--out-dir", "out",
                 "--out", "plan.yaml", "--book-root", str(ROOT)]) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"(\d+) distinct runs", out).group(1))
    grids, meta = G.load_grids("plan.yaml")
    unique = {s.hash for g in grids for s in G.plan(g, quiet=True)}
    assert n == len(unique) == meta["runs"] and meta["stage2_runs"] == 15
    assert meta["results"] == "out/experiments" and meta["chapters"]["05"] == ["book-table1", "book-ablation"]
    assert meta["estimate"]["runs"] == n and meta["estimate"]["images"] == {"train": 4, "val": 1, "test": 1}
    assert "TFLOP/s" in meta["estimate"]["how"]
    names = {g.name for g in grids}
    assert {"book-table1", "book-official", "book-ablation"} <= names
    # the paper book needs every Table-3 row whose weights exist here plus the rest of the chapters' grids
    ch = chapter_setup("paper", str(data), out_dir="out")
    assert n == len(BP.book_plan(ch).specs)
    # `pbip book --profile paper` with runs missing executes nothing and says how to make them
    capsys.readouterr()
    assert main(["book", "--profile", "paper", "--dataset", str(data), "--out-dir", "out", "--no-html",
                 "--book-root", str(fresh_book_copy(tmp_path)), "--chapters", "06"]) == 2
    err = capsys.readouterr().err
    assert "missing; nothing was executed" in err and "pbip run" in err


def test_gpu_hour_estimate_scales_with_the_work(tmp_path):
    ds = tmp_path / "bcss-wsss"                                            # not there: the manifest's sizes
    sizes = BP.split_sizes(ds)
    assert sizes == {"train": 23422, "val": 3418, "test": 4986}
    g1 = G.load_grid({"name": "a", "profile": "paper", "datasets": [str(ds)], "seeds": [0], "splits": ["test"]})
    one = BP.estimate_gpu_hours(G.plan(g1), sizes)
    two = BP.estimate_gpu_hours(G.plan(G.load_grid({**vars(g1), "seeds": [0, 1], "source": None})), sizes)
    assert two["stage1_hours"] == pytest.approx(2 * one["stage1_hours"], rel=0.02)
    steps = -(-23422 // 10) * 10
    assert one["stage1_hours"] == pytest.approx(steps * BP.STAGE1_STEP_GFLOP / 20e3 / 3600, rel=0.05)
    fast = BP.estimate_gpu_hours(G.plan(g1), sizes, tflops=40)
    assert fast["stage1_hours"] == pytest.approx(one["stage1_hours"] / 2, rel=0.05)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_plan_on_submitit_local_then_the_book_trains_nothing(tmp_path, capsys, monkeypatch):
    """`pbip book --plan` (smoke) -> `pbip run --executor slurm` with submitit's local executor -> the chapters read
    every run (`pbip book --no-train` would stop before executing anything if one were missing)."""
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path, n_train=8, n_val=2, n_test=2, size=32)
    common = ["--profile", "smoke", "--dataset", str(data), "--out-dir", "out", "--book-root",
              str(fresh_book_copy(tmp_path)), "--set", "bank.nk=2"]
    assert main(["book", "--plan", *common, "--out", "plan.yaml"]) == 0
    n = int(re.search(r"(\d+) distinct runs", capsys.readouterr().out).group(1))
    assert n >= 8
    assert main(["run", "plan.yaml", "--executor", "slurm", "--submitit-cluster", "local", "--jobs", "2",
                 "--time-min", "20"]) == 0
    assert f"{n} runs, 0 done, {n} to run" in capsys.readouterr().out
    grids, meta = G.load_grids("plan.yaml")
    assert ex.pending_runs(grids, meta["results"]) == []
    rows = [ex.read_row(meta["results"], s.hash) for s in ex._unique({g.name: G.plan(g) for g in grids})]
    assert all(r["status"] == "ok" for r in rows) and all(r["weights"] == "pretrained" or "RANDOM" in r["weights"]
                                                          for r in rows)
    # a second `pbip run` of the plan trains nothing
    assert main(["run", "plan.yaml"]) == 0
    assert f"{n} runs, {n} done, 0 to run" in capsys.readouterr().out
    # the chapters of Table 1 read them without training (--no-train: a missing run would stop the book)
    assert main(["book", *common, "--chapters", "06", "--no-deps", "--no-html", "--no-train"]) == 0
    assert (tmp_path / "out" / "experiments" / "book-table1.csv").is_file()
