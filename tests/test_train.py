"""Stage 1 end to end on the smoke profile: training, resume, NaN handling, pseudo masks, DDP on 2 CPU processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _pipeline import tiny_bank, tiny_data
from pbip_core.cli import main as cli
from pbip_core.config import make_config
from pbip_core.data import TrainDataset, list_pairs, list_train
from pbip_core.engine.bank import load_bank
from pbip_core.engine.build import prepare
from pbip_core.engine.pseudo import write_pseudo_masks
from pbip_core.engine.stage1 import train
from pbip_core.engine.step import loss_and_backward
from pbip_core.errors import PBIPError, TrainingError
from pbip_core.io import read_mask, read_rgb, save_png
from pbip_core.method.model import positive_pairs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    data = tiny_data(root)
    return root, data, tiny_bank(root, data)


def _cfg(**ov):
    return make_config("smoke", {"train.epochs": 2, **ov})


def test_bank_of_the_synthetic_set(setup):
    _, _, bank_path = setup
    bank = load_bank(bank_path)
    assert bank.features.shape[:2] == (4, 2) and bank.classes == ["TUM", "STR", "LYM", "NEC"]
    assert all(len(m) >= 1 for cls in bank.members for m in cls)
    st = bank.info["stats"]
    for n in range(4):
        assert 1 <= st["eligible"][n] == st["single_class"][n] - st["dropped_white"][n]
        chosen = sum(bank.members[n], [])
        assert len(set(chosen)) <= st["eligible"][n]


def test_resume_after_interruption_gives_the_same_model(setup, tmp_path):
    _, data, bank = setup
    full = train(_cfg(), data, bank, tmp_path / "full", progress=False)
    part = train(_cfg(), data, bank, tmp_path / "part", progress=False, stop_after_epoch=1)
    assert part == {"interrupted_after_epoch": 1}
    assert not (tmp_path / "part" / "metrics.json").exists()
    resumed = train(_cfg(), data, bank, tmp_path / "part", resume=True, progress=False)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    for k, v in a["classnet"].items():
        assert torch.allclose(v.float(), b["classnet"][k].float(), atol=1e-6), k
    assert resumed["best_val_miou"] == pytest.approx(full["best_val_miou"], abs=1e-9)
    hist = json.loads((tmp_path / "part" / "history.json").read_text())
    assert {"total", "cls", "fgs", "bgs"} <= set(hist["steps"][0]) and len(hist["epochs"]) == 2
    assert hist["steps"][0]["fgs"] > 0 and hist["steps"][0]["bgs"] > 0
    # a finished run is not silently overwritten; a changed config cannot resume
    with pytest.raises(PBIPError, match="already holds a finished run"):
        train(_cfg(), data, bank, tmp_path / "full", progress=False)
    with pytest.raises(PBIPError, match="different configuration"):
        train(_cfg(**{"train.lr": 0.5}), data, bank, tmp_path / "full", resume=True, progress=False)


def test_nan_loss_stops_with_a_clear_message(setup, tmp_path):
    _, data, bank = setup
    with pytest.raises(TrainingError, match="non-finite loss.*epoch 1"):
        train(_cfg(**{"loss.alpha": float("nan")}), data, bank, tmp_path / "nan", progress=False)


@pytest.mark.parametrize("method", ["cam", "official"])
def test_presets_train_and_write_pseudo_masks(setup, tmp_path, method):
    _, data, bank = setup
    run = tmp_path / method
    assert cli(["train", "--data", str(data), "--bank", str(bank), "--out", str(run), "--profile", "smoke",
                "--set", f"method={method}"]) == 0
    masks = tmp_path / f"{method}-masks"
    assert cli(["pseudo", "--run", str(run), "--data", str(data), "--split", "test", "--out", str(masks)]) == 0
    pairs = list_pairs(data, "test")
    for img, mask in pairs:
        pred = read_mask(masks / mask.name)
        gt = read_mask(mask)
        assert pred.shape == gt.shape and set(np.unique(pred)) <= {0, 1, 2, 3, 4}
        # restricted to the GT's classes (background 4 from the white rule allowed)
        assert set(np.unique(pred)) - {4} <= set(np.unique(gt)) - {4}
    out = tmp_path / f"{method}.json"
    assert cli(["evaluate", "--pred", str(masks), "--data", str(data), "--split", "test", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0 <= res["miou"] <= 1 and res["n_images"] == len(pairs)


def test_train_split_pseudo_masks_use_file_labels(setup, tmp_path):
    _, data, bank = setup
    train(make_config("smoke", {"method": "cam"}), data, bank, tmp_path / "r", progress=False)
    out = write_pseudo_masks(tmp_path / "r", data, "train", tmp_path / "m", progress=False)
    for path, label in list_train(data)[:12]:
        values = set(np.unique(read_mask(out / path.name))) - {4}
        assert values <= set(np.flatnonzero(label))


def test_pseudo_labels_of_the_config_change_the_test_masks(setup, tmp_path):
    """Issue 12.2: ``--set pseudo.labels=predicted`` is read by `pbip pseudo` (its --labels default) and
    write_pseudo_masks; on test it changes the masks against the GT-present classes."""
    _, data, bank = setup
    run = tmp_path / "pred"
    assert cli(["train", "--data", str(data), "--bank", str(bank), "--out", str(run), "--profile", "smoke",
                "--set", "method=cam", "--set", "pseudo.labels=predicted"]) == 0
    masks = {}
    for name, extra in (("default", []), ("gt", ["--labels", "gt"]), ("predicted", ["--labels", "predicted"])):
        out = tmp_path / name
        assert cli(["pseudo", "--run", str(run), "--data", str(data), "--split", "test", "--out", str(out),
                    *extra]) == 0
        masks[name] = [read_mask(out / m.name) for _, m in list_pairs(data, "test")]
    same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(masks[a], masks[b]))  # noqa: E731
    assert not same("gt", "predicted"), "precondition: the classifier's classes differ from the GT's on some image"
    assert same("default", "predicted")
    assert not same("default", "gt")


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_ddp_two_cpu_processes(setup, tmp_path):
    _, data, bank = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "pbip_core", "train", "--data", str(data), "--bank", str(bank), "--out", str(tmp_path / "ddp"),
           "--profile", "smoke", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    hist = json.loads((tmp_path / "ddp" / "history.json").read_text())
    # 48 images, batch 8 per rank, 2 ranks -> 3 steps per epoch
    assert metrics["steps"] == 3 and len(hist["epochs"]) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_ddp_odd_number_of_images_gives_every_rank_the_same_batches(tmp_path):
    """7 images, batch 3, 2 ranks: sharding the permutation as perm[rank::2] gave 4 and 3 images, i.e. 2 and 1
    batches, and rank 0 waited forever in a gradient all-reduce that rank 1 never called. Equal shards: 2 and 2."""
    from conftest import make_dataset

    data = make_dataset(tmp_path, n_train=7, n_val=2, n_test=2, size=64)
    bank = tmp_path / "bank.pt"
    assert cli(["bank", "--data", str(data), "--out", str(bank), "--profile", "smoke", "--k", "1",
                "--cache", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           "-m", "pbip_core", "train", "--data", str(data), "--bank", str(bank), "--out", str(tmp_path / "ddp"),
           "--profile", "smoke", "--device", "cpu", "--set", "train.batch_size=3", "--set", "train.dist_timeout_min=3"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["run"]["steps_per_rank"] == [2, 2] and metrics["steps"] == 2
    assert metrics["run"]["world_size"] == 2 and metrics["run"]["device"] == "cpu"
    assert "stage 1 on cpu (2 processes)" in res.stdout


def test_train_records_device_dtype_and_weight_sources(setup, tmp_path, capsys):
    _, data, bank = setup
    train(make_config("smoke", {"model.pretrained": False}), data, bank, tmp_path / "r", progress=False)
    info = json.loads((tmp_path / "r" / "run_info.json").read_text())
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["world_size"] == 1
    assert set(info["weights"]) == {"backbone", "encoder", "prototypes"}
    assert "efficientnet_lite0" in info["weights"]["backbone"] and info["random_weights"] == ["backbone"]
    assert "imagenet-efficientnet-lite0" in info["weights"]["encoder"]
    out = capsys.readouterr().out
    assert "=== stage 1 on cpu" in out and "RANDOM WEIGHTS in backbone" in out
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["run"]["weights"] == info["weights"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_train(setup, tmp_path, amp):
    """train.amp on the run's device (here the CPU): bf16 autocast, or fp16 with a gradient scaler whose state is
    saved with the checkpoint."""
    _, data, bank = setup
    cfg = make_config("smoke", {"train.amp": amp, "data.max_train": 4, "train.batch_size": 2, "train.val_every": 0})
    m = train(cfg, data, bank, tmp_path / "r", progress=False)
    assert m["run"]["dtype"].startswith({"bf16": "bfloat16", "fp16": "float16"}[amp])
    hist = json.loads((tmp_path / "r" / "history.json").read_text())
    assert hist["steps"] and all(np.isfinite(s["total"]) for s in hist["steps"])
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert bool(state["scaler"]) == (amp == "fp16")


def test_bad_inputs(setup, tmp_path):
    _, data, bank = setup
    assert cli(["train", "--data", str(tmp_path / "nope"), "--bank", str(bank), "--out", str(tmp_path / "o"),
                "--profile", "smoke"]) == 2
    assert cli(["train", "--data", str(data), "--bank", str(tmp_path / "nobank.pt"), "--out", str(tmp_path / "o"),
                "--profile", "smoke"]) == 2
    assert cli(["train", "--data", str(data), "--bank", str(bank), "--out", str(tmp_path / "o"),
                "--profile", "smoke", "--set", "model.delta=3"]) == 2


def test_encoder_chunk_memory_cap_gives_the_same_loss_and_gradients(setup):
    """train.encoder_chunk encodes and back-propagates FG/BG chunk by chunk: same loss and gradients as one call.

    (Compared on one step: over several AdamW steps float round-off in near-zero gradients is amplified to the
    learning-rate scale, so whole trajectories are not a fair comparison.)"""
    _, data, bank = setup
    grads, totals = [], []
    for chunk in (0, 4):
        cfg = make_config("smoke", {"train.encoder_chunk": chunk})
        torch.manual_seed(0)
        model, _, _ = prepare(cfg, data, bank, "cpu")
        ds = TrainDataset(data, image_size=cfg.data.image_size)
        x = torch.stack([ds[i]["image"] for i in range(8)])
        y = torch.stack([ds[i]["label"] for i in range(8)])
        assert y.sum() > 8                                   # several pairs, so chunks of 2 pairs really split them
        terms = loss_and_backward(model, x, y, positive_pairs(y), cfg.loss, chunk)
        totals.append(terms.total.item())
        grads.append({n: p.grad.clone() for n, p in model.classnet.named_parameters() if p.grad is not None})
    assert totals[0] == pytest.approx(totals[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("switches", [
    {}, {"model.pairs": "subclass"}, {"model.separation": "official"}, {"model.fgbg_space": "encoder"},
    {"model.cam_source": "last"}, {"loss.nce": "batch"}, {"model.threshold_scope": "global", "model.delta": 0.5},
    {"model.input_norm": "official", "loss.cam_reg": 0.0005}, {"method": "official"}],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "paper")
def test_chunked_step_equals_one_backward_for_every_switch(switches):
    """The chunked exact step (separable path, or the two-pass path of the batch InfoNCE) gives the loss and the
    gradients of one plain forward + backward for each official switch (tiny stand-in networks)."""
    from _fakes import TinyBackbone, TinyEncoder
    from pbip_core.engine.build import build_model

    cfg = make_config("smoke", {"model.levels": (2, 3, 4), "loss.cls_level_weights": (), "pseudo.level_weights": (),
                                **switches})
    torch.manual_seed(0)
    protos, x = torch.randn(3, 2, 6), torch.rand(4, 3, 32, 32)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    grads, totals = [], []
    for plain in (False, True):
        torch.manual_seed(1)
        model = build_model(cfg, protos, TinyEncoder(d=6), backbone=TinyBackbone())
        terms = loss_and_backward(model, x, y, positive_pairs(y), cfg.loss, chunk=2,
                                  ddp_model=model if plain else None)
        totals.append(terms.total.item())
        assert terms.fgs.item() > 0 and terms.bgs.item() > 0
        grads.append({n: p.grad.clone() for n, p in model.classnet.named_parameters() if p.grad is not None})
    assert totals[0] == pytest.approx(totals[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for k in grads[0]:                                       # float round-off only: 1e-4 of the tensor's largest entry
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-4 * float(grads[1][k].abs().max()), rtol=1e-3), k


def test_a_new_three_class_folder_runs_through_the_same_commands(setup, tmp_path):
    """Any dataset folder with a dataset.yaml: here 3 classes (NEC merged into background), no code change."""

    _, data, _ = setup
    new = tmp_path / "three"
    (new / "train").mkdir(parents=True)
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    for p in sorted((data / "train").glob("*.png")):
        lab = re.search(r"\[([01 ]+)\]", p.name).group(1).replace(" ", "")
        if lab[:3] == "000":
            continue
        shutil.copy(p, new / "train" / re.sub(r"\[[01 ]+\]", "[" + " ".join(lab[:3]) + "]", p.name))
    for split in ("val", "test"):
        (new / split / "img").mkdir(parents=True)
        for m in sorted((data / split / "mask").glob("*.png")):
            mask = read_mask(m)
            mask = np.where(mask >= 3, 3, mask).astype(np.uint8)     # NEC and glass -> background 3
            if (mask < 3).sum() == 0:
                continue
            save_png(mask, new / split / "mask" / m.name, palette)
            save_png(read_rgb(data / split / "img" / m.name), new / split / "img" / m.name)
    (new / "dataset.yaml").write_text("name: three\nclasses: [TUM, STR, LYM]\nbackground_index: 3\n"
                                      "palette: [[255,0,0],[0,255,0],[0,0,255],[255,255,255]]\n")
    assert cli(["data", "check", str(new)]) == 0
    bank = tmp_path / "bank3.pt"
    assert cli(["bank", "--data", str(new), "--out", str(bank), "--profile", "smoke",
                "--cache", str(tmp_path / "cache")]) == 0
    run = tmp_path / "run3"
    assert cli(["train", "--data", str(new), "--bank", str(bank), "--out", str(run), "--profile", "smoke"]) == 0
    assert cli(["pseudo", "--run", str(run), "--data", str(new), "--split", "test", "--out", str(tmp_path / "m3")]) == 0
    out = tmp_path / "m3.json"
    assert cli(["evaluate", "--pred", str(tmp_path / "m3"), "--data", str(new), "--split", "test",
                "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["per_class_iou"]) == {"TUM", "STR", "LYM"}
