"""The experiment runner: grids, planning, hashing, resumable execution, dry run (pbip_core.experiments)."""

from __future__ import annotations

import pandas as pd
import pytest

from pbip_core.experiments import grid as G
from pbip_core.experiments import runner as ex
from pbip_core.errors import ConfigError


def _grid(tmp_path, **kw):
    d = {"name": "g", "profile": "smoke", "datasets": [str(tmp_path / "ds")], "methods": ["pbip", "cam"],
         "variants": {"default": {}}, "seeds": [0, 1], "stage2": False, "splits": ["val"]}
    d.update(kw)
    return G.load_grid(d)


class FakeStep:
    """Records calls; raises ``exc`` on the call numbers in ``fail_on`` (1-based)."""

    def __init__(self, fail_on=(), exc=RuntimeError):
        self.calls: list[str] = []
        self.fail_on, self.exc = set(fail_on), exc

    def __call__(self, spec, run_dir):
        self.calls.append(spec.hash)
        assert run_dir.is_dir() and (run_dir / "config.yaml").is_file()
        if len(self.calls) in self.fail_on:
            raise self.exc("boom")
        return {"stage1.val.miou": 0.5 + 0.01 * spec.seed, "stage1.val.iou.TUM": 0.4}


def test_plan_is_the_cartesian_product_with_configs(tmp_path):
    g = _grid(tmp_path, variants={"default": {}, "k2": {"bank.k": 2, "model.delta": 0.3}})
    specs = G.plan(g)
    assert len(specs) == 1 * 2 * 2 * 2
    cam = [s for s in specs if s.method == "cam"][0]
    assert cam.cfg.model.sim is False and cam.cfg.profile == "smoke"
    k2 = [s for s in specs if s.variant == "k2"]
    assert len(k2) == 4 and all(s.cfg.bank.k == 2 and s.cfg.model.delta == 0.3 for s in k2)
    assert {s.cfg.train.seed for s in specs} == {0, 1}
    assert all(s.cfg.data.root == str(tmp_path / "ds") for s in specs)
    assert all(s.cfg.bank.seed == 0 for s in specs)  # the bank does not vary with the training seed
    assert len({s.hash for s in specs}) == len(specs)


def test_identical_configs_are_one_run(tmp_path):
    # the cam preset already switches L_BGS off, so cam/no_bgs == cam/default
    g = _grid(tmp_path, variants={"default": {}, "no_bgs": {"loss.bgs": False}}, seeds=[0])
    specs = G.plan(g, quiet=True)
    labels = [(s.method, s.variant) for s in specs]
    assert labels == [("pbip", "default"), ("pbip", "no_bgs"), ("cam", "default")]
    assert specs[2].aliases == ["cam/no_bgs"]
    df = ex.run_grid(g, tmp_path / "results", step=FakeStep())
    assert df.set_index("method").loc["cam", "aliases"] == "cam/no_bgs"


def test_hash_is_stable_and_sensitive(tmp_path):
    a = G.plan(_grid(tmp_path))
    b = G.plan(_grid(tmp_path))
    assert [s.hash for s in a] == [s.hash for s in b]
    # same config, different grid stage flags or dataset -> different run
    c = G.plan(_grid(tmp_path, stage2=True))
    d = G.plan(_grid(tmp_path, datasets=[str(tmp_path / "other")]))
    e = G.plan(_grid(tmp_path, overrides={"train.lr": 0.5}))
    for other in (c, d, e):
        assert not {s.hash for s in a} & {s.hash for s in other}
    # the grid's name and the order of its lists do not change a run's identity
    f = G.plan(_grid(tmp_path, name="renamed", seeds=[1, 0], methods=["cam", "pbip"]))
    assert {s.hash for s in a} == {s.hash for s in f}
    # a hash is 16 hex digits
    assert all(len(s.hash) == 16 and int(s.hash, 16) >= 0 for s in a)


def test_interrupted_grid_resumes_without_redoing_finished_runs(tmp_path):
    g = _grid(tmp_path)
    results = tmp_path / "results"
    step = FakeStep(fail_on={3}, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        ex.run_grid(g, results, step=step)
    first_two = step.calls[:2]
    assert len(step.calls) == 3
    assert len(ex.load_results(results / "g.csv")) == 2

    step2 = FakeStep()
    df = ex.run_grid(g, results, step=step2)
    assert not set(first_two) & set(step2.calls)
    assert len(step2.calls) == 2  # the interrupted run and the one never started
    assert len(df) == 4 and df["hash"].is_unique and (df["status"] == "ok").all()
    assert set(df["hash"]) == {s.hash for s in G.plan(g)}

    step3 = FakeStep()
    ex.run_grid(g, results, step=step3)
    assert step3.calls == []


def test_failed_run_is_recorded_and_retried(tmp_path):
    g = _grid(tmp_path)
    results = tmp_path / "results"
    step = FakeStep(fail_on={3})
    df = ex.run_grid(g, results, step=step)
    assert len(step.calls) == 4  # a failure does not stop the grid
    assert sorted(df["status"]) == ["failed", "ok", "ok", "ok"]
    failed = df[df["status"] == "failed"].iloc[0]
    assert "RuntimeError: boom" in failed["error"]
    assert (results / "runs" / failed["hash"] / "error.txt").is_file()

    step2 = FakeStep()
    df2 = ex.run_grid(g, results, step=step2)
    assert step2.calls == [failed["hash"]]
    assert len(df2) == 4 and (df2["status"] == "ok").all() and df2["hash"].is_unique


def test_table_columns(tmp_path):
    g = _grid(tmp_path, seeds=[0])
    df = ex.run_grid(g, tmp_path / "results", step=FakeStep())
    for col in ("grid", "hash", "dataset", "method", "variant", "seed", "status", "wall_time_s",
                "train.lr", "model.sim", "bank.encoder", "stage2.backbone", "stage1.val.miou", "stage1.val.iou.TUM"):
        assert col in df.columns, col
    assert df.set_index("method").loc["cam", "model.sim"] in (False, "False")
    assert df.set_index("method").loc["pbip", "stage1.val.miou"] == pytest.approx(0.5)
    # the file on disk is the same table
    disk = pd.read_csv(tmp_path / "results" / "g.csv")
    assert len(disk) == 2 and list(disk.columns[:6]) == ["grid", "hash", "dataset", "method", "variant", "seed"]


def test_flatten_metrics():
    flat = ex.flatten_metrics("stage2", "test", {"miou": 0.5, "per_class_iou": {"TUM": 0.7, "STR": 0.3},
                                                  "n_images": 4, "confusion": [[1, 2], [3, 4]]})
    assert flat == {"stage2.test.miou": 0.5, "stage2.test.iou.TUM": 0.7, "stage2.test.iou.STR": 0.3,
                    "stage2.test.n_images": 4}


def test_dry_run_lists_runs_and_missing_datasets(tmp_path, capsys):
    g = _grid(tmp_path, datasets=[str(tmp_path / "no-such-dataset")])
    step = FakeStep()
    df = ex.run_grid(g, tmp_path / "results", dry_run=True, step=step)
    out = capsys.readouterr().out
    assert step.calls == []
    assert len(df) == 4 and set(df["status"]) == {"pending"}
    assert "no-such-dataset: folder not found" in out
    for s in G.plan(g):
        assert s.hash in out
    assert not (tmp_path / "results" / "g.csv").exists()


def test_dry_run_marks_done_runs(tmp_path):
    (tmp_path / "ds").mkdir()
    g = _grid(tmp_path, seeds=[0])
    ex.run_grid(g, tmp_path / "results", step=FakeStep())
    df = ex.run_grid(g, tmp_path / "results", dry_run=True)
    assert set(df["status"]) == {"done"}
    assert not any("ds: folder not found" in m for m in df.attrs["missing"])


def test_cli_dry_run_on_builtin_paper_grid(capsys, tmp_path, monkeypatch):
    from pbip_core.cli import main

    monkeypatch.chdir(tmp_path)  # the grid's relative data/bcss-wsss is certainly missing here
    rc = main(["run", "--dry-run", "--allow-missing", "table1-bcss-wsss"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "grid table1-bcss-wsss (profile paper" in out
    assert "missing:" in out and "bcss-wsss: folder not found" in out
    assert out.count("pending") == 5
    # without --allow-missing the same listing ends with a one-line error and exit status 2
    rc = main(["run", "--dry-run", "table1-bcss-wsss"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out.count("pending") == 5
    assert "pbip run: error:" in cap.err and "missing" in cap.err and "--allow-missing" in cap.err


def test_builtin_grids_load():
    for p in sorted(G.GRIDS_DIR.glob("*.yaml")):
        g = G.load_grid(p)
        assert G.plan(g), p


def test_bad_grids_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown grid keys"):
        G.load_grid({"name": "x", "sedes": [0]})
    with pytest.raises(ConfigError, match="not found"):
        G.load_grid(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError):
        G.plan(G.load_grid({"name": "x", "methods": ["nope"]}))
    with pytest.raises(ConfigError, match="split"):
        G.load_grid({"name": "x", "splits": ["dev"]})


@pytest.mark.slow
def test_real_tiny_grid_end_to_end(tmp_path):
    """The real pipeline (bank -> stage 1 -> pseudo masks -> scores -> stage 2) on a tiny folder, smoke profile."""
    from conftest import make_dataset

    root = make_dataset(tmp_path, n_train=12, n_val=2, n_test=2, size=32)
    grid = {"name": "tiny", "profile": "smoke", "datasets": [str(root)], "methods": ["pbip"], "seeds": [0],
            "stage2": True, "splits": ["val"],
            "overrides": {"data.image_size": 32, "stage2.image_size": 32, "bank.nk": 2, "train.device": "cpu",
                          "stage2.batch_size": 6}}
    df = ex.run_grid(grid, tmp_path / "results")
    assert len(df) == 1
    row = df.iloc[0]
    assert row["status"] == "ok", row.get("error")
    for col in ("stage1.val.miou", "stage2.val.miou", "stage2.test.miou", "stage2.test.iou.C0"):
        assert 0.0 <= float(row[col]) <= 1.0, col
    run = tmp_path / "results" / "runs" / row["hash"]
    assert (run / "stage1" / "last.pt").is_file() and (run / "stage2" / "metrics.json").is_file()
    assert len(list((tmp_path / "results" / "banks").glob("*.pt"))) == 1
    # rerun: nothing to do
    df2 = ex.run_grid(grid, tmp_path / "results", step=FakeStep())
    assert len(df2) == 1 and df2.iloc[0]["wall_time_s"] == row["wall_time_s"]
    # the same data under another absolute path, the results folder moved: still nothing to do
    import shutil

    copy = tmp_path / "elsewhere" / "toy"
    shutil.copytree(root, copy)
    shutil.move(str(tmp_path / "results"), tmp_path / "moved")
    step = FakeStep()
    df3 = ex.run_grid({**grid, "datasets": [str(copy)]}, tmp_path / "moved", step=step)
    assert step.calls == [] and df3.iloc[0]["hash"] == row["hash"] and df3.iloc[0]["status"] == "ok"
    # smoke: stage 1 on the offline ImageNet weights, stage 2 from random initialisation (stage2.pretrained=false)
    assert df3.iloc[0]["weights"] == "RANDOM WEIGHTS: stage-2 backbone" and df3.iloc[0]["device"] == "cpu"


def _parallel_step(spec, run_dir):
    import os

    import torch

    return {"stage1.val.miou": 0.1 * spec.seed, "threads": torch.get_num_threads(), "pid": os.getpid()}


def test_parallel_jobs_fill_the_same_table(tmp_path):
    g = _grid(tmp_path, methods=["pbip"], seeds=[0, 1, 2])
    df = ex.run_grid(g, tmp_path / "results", jobs=2, step=_parallel_step)
    assert len(df) == 3 and (df["status"] == "ok").all() and df["hash"].is_unique
    assert sorted(df["stage1.val.miou"]) == pytest.approx([0.0, 0.1, 0.2])
    assert df["pid"].nunique() >= 1 and (df["threads"] >= 1).all()


@pytest.mark.parametrize("labels, ckpt", [("gt", "best"), ("predicted", "last")])
def test_pipeline_scores_with_the_configs_labels_and_checkpoint(tmp_path, monkeypatch, labels, ckpt):
    """Issue 12.2: pseudo.labels reaches the pseudo masks the pipeline scores; pseudo.test_checkpoint picks the
    weights of val/test (the train masks for stage 2 always come from best.pt)."""
    calls = []
    monkeypatch.setattr(ex, "build_bank", lambda *a, **k: None)
    monkeypatch.setattr(ex, "save_bank", lambda bank, path: path.write_bytes(b"x"))
    monkeypatch.setattr(ex, "train", lambda *a, **k: {})
    monkeypatch.setattr(ex, "evaluate_dir", lambda *a, **k: {"miou": 0.5})

    def fake_write(run, data, split, out, labels=None, device="auto", checkpoint="best.pt", progress=True):
        calls.append((split, labels, checkpoint))
        return out

    monkeypatch.setattr(ex, "write_pseudo_masks", fake_write)
    g = _grid(tmp_path, methods=["pbip"], seeds=[0], splits=["train", "val", "test"],
              overrides={"pseudo.labels": labels, "pseudo.test_checkpoint": ckpt})
    spec = G.plan(g)[0]
    out = ex.pipeline_step(spec, tmp_path / "run", tmp_path / "results")
    scored = {k: v for k, v in out.items() if k.endswith(".miou")}
    expected = {"stage1.val.miou": 0.5, "stage1.test.miou": 0.5}
    if labels == "gt":      # the same masks are also scored with the classifier's own classes
        expected.update({"stage1_predicted.val.miou": 0.5, "stage1_predicted.test.miou": 0.5})
    assert scored == expected
    by_split = {(s, lab): c for s, lab, c in calls}
    assert by_split[("val", labels)] == f"{ckpt}.pt" and by_split[("test", labels)] == f"{ckpt}.pt"
    assert len(calls) == (5 if labels == "gt" else 3)       # train, val, test (+ val, test with predicted classes)
    assert [c for (s, _), c in by_split.items() if s == "train"] == ["best.pt"]


def test_figure4_random_banks_follow_the_run_seed(tmp_path):
    """bank.seed_from_train: the random sub-banks of book-fig4 are drawn per seed (distinct bank seeds and cached
    banks); the clustered bank stays one bank whatever the seed."""
    grid = G.load_grid("book-fig4", "smoke", str(tmp_path / "ds"), seeds=[0, 1, 2],
                       variants=["cluster", "random"])
    specs = G.plan(grid, quiet=True)
    seeds = {(s.variant, s.seed): s.cfg.bank.seed for s in specs}
    banks = {(s.variant, s.seed): ex.bank_path_for(s, tmp_path) for s in specs}
    assert [seeds[("random", k)] for k in (0, 1, 2)] == [0, 1, 2]
    assert len({banks[("random", k)] for k in (0, 1, 2)}) == 3
    assert {seeds[("cluster", k)] for k in (0, 1, 2)} == {0}
    assert len({banks[("cluster", k)] for k in (0, 1, 2)}) == 1


def test_pbip_pseudo_checkpoint_default_follows_the_run_config(tmp_path):
    """`pbip pseudo` without --checkpoint: best.pt, or last.pt on val/test when pseudo.test_checkpoint=last."""
    from pbip_core.config import make_config
    from pbip_core.engine.pseudo import default_checkpoint

    for ckpt, want in (("best", "best.pt"), ("last", "last.pt")):
        run = tmp_path / ckpt
        run.mkdir()
        make_config("smoke", {"pseudo.test_checkpoint": ckpt}).save(run / "config.yaml")
        assert default_checkpoint(run, "test") == want and default_checkpoint(run, "val") == want
        assert default_checkpoint(run, "train") == "best.pt"
