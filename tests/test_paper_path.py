"""The paper profile's own code path on a CPU, end to end, on a tiny dataset.

Everything only the paper profile touches runs here: MiT-B1 as the ClassNet backbone, MedCLIP's architecture (Swin-T +
projection) as the encoder, bf16 autocast, DataLoader workers, the paper profile's CPU refusal, DeepLab-v2 on
ResNet-101 in stage 2, the book's plan for the paper profile and one of its runs through `pbip run --only` (stage 1
and stage 2). Weights are random (no hub here): `model.pretrained=false`, `stage2.pretrained=false` and
`bank.random_init=true`, and every record says RANDOM WEIGHTS. Only sizes are shrunk through `--set`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _book_support import fresh_book_copy
from conftest import make_dataset
from pbip_core.cli import main
from pbip_core.experiments import grid as G
from pbip_core.experiments import runner as ex

ROOT = Path(__file__).resolve().parents[1]

#: The paper profile shrunk to a tiny dataset; nothing here switches a code path off.
PAPER_ON_CPU = [
    "train.allow_cpu=true", "model.pretrained=false", "stage2.pretrained=false", "bank.random_init=true",
    "data.image_size=64", "stage2.image_size=64", "bank.k=1", "bank.nk=1", "train.epochs=1", "train.batch_size=2",
    "stage2.epochs=1", "stage2.batch_size=2", "data.num_workers=1",
]


def _sets(items):
    return [a for kv in items for a in ("--set", kv)]


@pytest.mark.slow
def test_paper_profile_end_to_end_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path, n_train=3, n_val=2, n_test=2, size=64, n_classes=2)
    # without train.allow_cpu the paper profile stops at once, naming the key
    assert main(["bank", "--data", str(data), "--out", "b.pt", "--profile", "paper", "--device", "cpu"]) == 2
    assert "train.allow_cpu=true" in capsys.readouterr().err

    # the book's plan for the paper profile, with the overrides
    assert main(["book", "--plan", "--profile", "paper", "--dataset", str(data), "--out-dir", "out",
                 "--out", "plan.yaml", "--book-root", str(ROOT), *_sets(PAPER_ON_CPU)]) == 0
    printed = capsys.readouterr().out
    n = int(re.search(r"(\d+) distinct runs", printed).group(1))
    grids, meta = G.load_grids("plan.yaml")
    assert n == meta["runs"] > 100 and meta["profile"] == "paper"
    assert all(g.profile == "paper" and g.overrides["bank.random_init"] is True for g in grids)

    # one run of Table 1 (PBIP, seed 0: bank, stage 1, pseudo masks, stage 2), as one scheduler task would run it
    table1 = next(g for g in grids if g.name == "book-table1")
    spec = next(s for s in G.plan(table1, quiet=True) if s.method == "pbip" and s.seed == 0)
    assert spec.cfg.model.backbone == "mit_b1" and spec.cfg.bank.encoder == "medclip"
    assert spec.cfg.stage2.backbone == "resnet101" and spec.cfg.train.amp == "bf16" and spec.stage2
    assert main(["run", "plan.yaml", "--only", spec.hash]) == 0
    printed = capsys.readouterr().out
    assert "=== stage 1 on cpu (1 process), bfloat16 autocast" in printed and "RANDOM WEIGHTS" in printed
    assert "RESNET101 with RANDOM INITIALISATION" in printed

    row = ex.read_row("out/experiments", spec.hash)
    assert row["status"] == "ok", row.get("error")
    assert row["weights"].startswith("RANDOM WEIGHTS") and "encoder" in row["weights"] and "stage-2" in row["weights"]
    assert row["device"] == "cpu" and row["bank.random_init"] is True
    for col in ("stage1.val.miou", "stage1.test.miou", "stage2.val.miou", "stage2.test.miou"):
        assert 0.0 <= float(row[col]) <= 1.0, col
    run = Path("out/experiments/runs") / spec.hash
    info = json.loads((run / "stage1" / "run_info.json").read_text())
    assert info["weights"]["encoder"].startswith("medclip: RANDOM WEIGHTS")
    assert "mit_b1" in info["weights"]["backbone"] and "random init" in info["weights"]["backbone"]
    assert "RANDOM WEIGHTS" in info["weights"]["prototypes"]
    s2 = json.loads((run / "stage2" / "metrics.json").read_text())["run"]
    assert s2["dtype"].startswith("bfloat16") and s2["random_weights"] == ["backbone"]

    # the book still misses the other runs: `pbip book --profile paper` says so and executes nothing
    assert main(["book", "--profile", "paper", "--dataset", str(data), "--out-dir", "out", "--no-html",
                 "--book-root", str(fresh_book_copy(tmp_path)), "--chapters", "05", "--no-deps",
                 *_sets(PAPER_ON_CPU)]) == 2
    err = capsys.readouterr().err
    # chapter 05 reads book-table1 (3 methods x 5 seeds) and the shared stage-1 run of book-ablation
    assert "15 of the 16 runs the chapters read are missing; nothing was executed" in err
