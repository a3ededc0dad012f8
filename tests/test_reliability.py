"""Reliability (issue 11): loading a run never executes code, no work is lost silently, every mistake is one line.

The table :data:`CASES` drives :func:`test_bad_input_is_one_line_and_writes_nothing`: each case builds its input in a
fresh folder, runs the ``pbip`` command line in-process, and asserts exit status 2, a message naming the file or key,
and that the folder is byte-for-byte what it was before (nothing written, nothing lost, no marker file of a malicious
pickle). The tests after the table cover the parts a single failing command cannot show: the image-mode policy of
every reader, the checkpoint conversion path, claims of run folders, two ``pbip run`` processes on one grid, and a
``kill -9`` followed by ``--resume``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_dataset
from PIL import Image

from pbip_core.cli import main as cli
from pbip_core.cli import pipeline as pipeline_cli
from pbip_core.config import load_config
from pbip_core.data import ebhi_seg as ebhi
from pbip_core.data.check import check_dataset, preflight_dataset
from pbip_core.engine import claims
from pbip_core.engine.bank import save_bank
from pbip_core.engine.checkpoint import load_checkpoint, save_checkpoint
from pbip_core.engine.runtime import rng_state
from pbip_core.errors import DataError, RunClaimedError
from pbip_core.experiments import runner as ex
from pbip_core.experiments.grid import load_grid, plan
from pbip_core.io import read_mask, read_rgb
from pbip_core.method.bank import PrototypeBank

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
N_CLASSES = 4
#: Tiny real runs: the smoke profile at 32 px, the CAM preset (no frozen encoder needed, so a bank of random
#: prototypes serves) and a backbone without downloaded weights.
OVERRIDES = ["data.image_size=32", "stage2.image_size=32", "method=cam", "model.pretrained=false"]
SMOKE = ["--profile", "smoke", "--device", "cpu", *[a for o in OVERRIDES for a in ("--set", o)]]


# ---------------------------------------------------------------------------------------------------- helpers
class Evil:
    """Unpickling this object runs ``touch MARKER`` (what a crafted last.pt / best.pt / bank can do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> sha256 of the bytes (or ``<dir>``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def png_bytes(arr: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit-per-channel RGB): colour type 0 grey, 2 RGB."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_i16(path: Path, value: int, shape=(32, 32)) -> None:
    Image.fromarray(np.full(shape, value, dtype=np.uint16)).save(path)       # mode I;16 PNG


def random_bank(path: Path, d: int = 16) -> Path:
    g = torch.Generator().manual_seed(0)
    save_bank(PrototypeBank(torch.randn(N_CLASSES, 2, d, generator=g), [f"C{i}" for i in range(N_CLASSES)],
                            "test-random-bank"), path)
    return path


def pseudo_masks(data: Path, out: Path) -> Path:
    """An L-mode class-index mask for every training image (what `pbip pseudo --split train` would write)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for p in sorted((data / "train").glob("*.png")):
        with Image.open(p) as im:
            w, h = im.size
        Image.fromarray(rng.integers(0, N_CLASSES, (h, w)).astype(np.uint8), mode="L").save(out / p.name)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny 4-class dataset (8 train, 2 val, 2 test, 32 px), a bank of random prototypes for it, and a finished
    stage-1 run trained on it with the SMOKE options (config.yaml, last.pt, best.pt, history.json, metrics.json)."""
    root = tmp_path_factory.mktemp("reliability")
    data = make_dataset(root, n_train=8, n_val=2, n_test=2, size=32)
    bank = random_bank(root / "bank.pt")
    assert cli(["train", "--data", str(data), "--bank", str(bank), "--out", str(root / "run"), *SMOKE]) == 0
    return data, bank, root / "run"


def stage1_run(env: Env, finished: bool = False) -> Path:
    """A copy of the fixture's stage-1 run, trained on ``env.data`` (a partial run unless ``finished``); its
    config.yaml names this copy of the data, so `--resume` with the SMOKE options accepts it."""
    run = shutil.copytree(env.run, env.tmp / "run")
    cfg = load_config(run / "config.yaml")
    cfg.data.root = str(env.data)
    cfg.save(run / "config.yaml")
    if not finished:
        (run / "metrics.json").unlink()
    return run


@dataclass
class Env:
    """A case's folder: its own copy of the dataset, the bank, and what the case checks beyond the snapshot."""

    tmp: Path
    data: Path
    bank: Path
    run: Path                                           # the fixture's finished stage-1 run (copy it before use)
    marker: Path
    keep: list[Path] = field(default_factory=list)      # files whose bytes must not change (also in the snapshot)


# ---------------------------------------------------------------------------------------------------- the table
def _train(env: Env, out: Path, *more: str) -> list[str]:
    return ["train", "--data", str(env.data), "--bank", str(env.bank), "--out", str(out), *SMOKE, *more]


def _stage2(env: Env, out: Path, *more: str) -> list[str]:
    masks = pseudo_masks(env.data, env.tmp / "masks")
    return ["stage2", "--data", str(env.data), "--masks", str(masks), "--out", str(out), *SMOKE, *more]


def c_bank_pickle_runs_code(env: Env) -> tuple[list[str], str]:
    evil = env.tmp / "evil_bank.pkl"                   # a plain pickle, like the official prototype file
    evil.write_bytes(pickle.dumps({"features": Evil(env.marker), "k_list": [1]}))
    env.bank = evil
    return _train(env, env.tmp / "run"), "evil_bank.pkl: cannot read prototype file (UnpicklingError: refusing"


def c_bank_torch_file_runs_code(env: Env) -> tuple[list[str], str]:
    evil = env.tmp / "evil_bank.pt"                    # a torch file, like `pbip bank` writes
    torch.save({"format": "pbip-bank-v1", "features": Evil(env.marker), "classes": ["a"]}, evil)
    env.bank = evil
    return _train(env, env.tmp / "run"), ("evil_bank.pt: refused to load: the bank holds Python objects other "
                                          "than tensors and plain data (it refers to posix.system)")


def c_stage1_last_runs_code(env: Env) -> tuple[list[str], str]:
    run = stage1_run(env)
    torch.save({"classnet": Evil(env.marker), "epoch": 1}, run / "last.pt")
    env.keep.append(run / "last.pt")
    return _train(env, run, "--resume"), ("last.pt: refused to load: the file holds Python objects other than "
                                          "tensors and plain data (it refers to posix.system)")


def c_stage1_best_runs_code(env: Env) -> tuple[list[str], str]:
    run = stage1_run(env, finished=True)
    torch.save({"classnet": Evil(env.marker), "epoch": 1}, run / "best.pt")
    return (["pseudo", "--run", str(run), "--data", str(env.data), "--split", "val", "--out",
             str(env.tmp / "masks_out"), "--device", "cpu"], "best.pt: refused to load")


def c_stage2_last_runs_code(env: Env) -> tuple[list[str], str]:
    run = env.tmp / "run2"
    run.mkdir()
    torch.save({"model": Evil(env.marker), "epoch": 1}, run / "last.pt")
    return _stage2(env, run, "--resume"), "last.pt: refused to load"


def c_train_16bit_image(env: Env) -> tuple[list[str], str]:
    first = min((env.data / "train").glob("*.png"))
    write_i16(first, 40000)
    return _train(env, env.tmp / "run"), f"{first.name}: 16-bit grayscale image (mode I;16)"


def c_train_rerun_partial(env: Env) -> tuple[list[str], str]:
    run = stage1_run(env)
    env.keep.append(run / "last.pt")
    return _train(env, run), "holds a partial run (last.pt, no metrics.json); pass --resume"


def c_train_rerun_finished(env: Env) -> tuple[list[str], str]:
    run = stage1_run(env, finished=True)
    env.keep.append(run / "last.pt")
    return _train(env, run), "already holds a finished run; pass --resume to continue it, --overwrite"


def c_stage2_rerun_partial(env: Env) -> tuple[list[str], str]:
    run = env.tmp / "run2"
    run.mkdir()
    save_checkpoint({"epoch": 1, "model": {"w": torch.ones(2)}}, run / "last.pt")
    env.keep.append(run / "last.pt")
    return _stage2(env, run), "holds a partial run"


def c_train_claimed(env: Env) -> tuple[list[str], str]:
    run = stage1_run(env)
    env.keep.append(run / "last.pt")
    _held.append(claims.acquire(run, "a test holding the run"))      # a live process (this one) holds it
    return _train(env, run, "--resume"), f"in use by pid {os.getpid()} on host {socket.gethostname()}"


def c_stage2_claimed(env: Env) -> tuple[list[str], str]:
    run = env.tmp / "run2"
    _held.append(claims.acquire(run, "a test holding the run"))
    return _stage2(env, run), f"in use by pid {os.getpid()}"


def c_train_bad_val_mask(env: Env) -> tuple[list[str], str]:
    mask = max((env.data / "val" / "mask").glob("*.png"))
    arr = read_mask(mask)
    arr[0, 0] = 9                                       # neither a class (0..3) nor background (4)
    Image.fromarray(arr, mode="L").save(mask)
    return _train(env, env.tmp / "run"), f"{mask.name}: mask values [9] outside the classes"


def c_stage2_bad_test_mask(env: Env) -> tuple[list[str], str]:
    mask = min((env.data / "test" / "mask").glob("*.png"))
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(mask)   # the image is 32x32
    return _stage2(env, env.tmp / "run2"), f"{mask.name}: mask size 16x16 differs from image size 32x32"


def _run_with_last(env: Env, data: bytes) -> tuple[list[str], Path]:
    run = stage1_run(env)
    (run / "last.pt").write_bytes(data)
    env.keep.append(run / "last.pt")
    return _train(env, run, "--resume"), run


def c_train_resume_truncated_last(env: Env) -> tuple[list[str], str]:
    whole = (env.run / "last.pt").read_bytes()
    argv, _ = _run_with_last(env, whole[: len(whole) // 2])               # e.g. a copy cut short
    return argv, "last.pt: corrupt or truncated stage-1 checkpoint"


def c_train_resume_empty_last(env: Env) -> tuple[list[str], str]:
    argv, _ = _run_with_last(env, b"")
    return argv, "last.pt: empty stage-1 checkpoint (0 bytes); start over with --overwrite"


def c_train_out_is_file(env: Env) -> tuple[list[str], str]:
    (env.tmp / "run").write_text("a file, not a folder")
    return _train(env, env.tmp / "run"), "run: --out is an existing file, not a folder"


def c_train_out_under_file(env: Env) -> tuple[list[str], str]:
    (env.tmp / "blocker").write_text("x")              # cannot be created, even by root
    return _train(env, env.tmp / "blocker" / "run"), "run: --out cannot be created"


def c_pseudo_out_is_file(env: Env) -> tuple[list[str], str]:
    run = stage1_run(env, finished=True)
    (env.tmp / "masks_out").write_text("x")
    return (["pseudo", "--run", str(run), "--data", str(env.data), "--split", "val", "--out",
             str(env.tmp / "masks_out"), "--device", "cpu"], "masks_out: --out is an existing file")


def c_stage2_out_is_file(env: Env) -> tuple[list[str], str]:
    (env.tmp / "run2").write_text("x")
    return _stage2(env, env.tmp / "run2"), "run2: --out is an existing file"


def c_bank_out_is_folder(env: Env) -> tuple[list[str], str]:
    (env.tmp / "bankdir").mkdir()
    return (["bank", "--data", str(env.data), "--out", str(env.tmp / "bankdir"), "--cache", str(env.tmp / "cache"),
             *SMOKE], "bankdir: --out is an existing folder; give a file name")


def c_evaluate_json_is_folder(env: Env) -> tuple[list[str], str]:
    (env.tmp / "metrics").mkdir()
    return (["evaluate", "--pred", str(env.data / "val" / "mask"), "--data", str(env.data), "--split", "val",
             "--json", str(env.tmp / "metrics")], "metrics: --json is an existing folder")


def c_evaluate_extra_files(env: Env) -> tuple[list[str], str]:
    pred = env.tmp / "pred"
    shutil.copytree(env.data / "val" / "mask", pred)
    shutil.copy(min((env.data / "test" / "mask").glob("*.png")), pred / "stray.png")
    return (["evaluate", "--pred", str(pred), "--data", str(env.data), "--split", "val"],
            "stray.png: not the prediction of a val mask")


def c_train_lr_negative(env: Env) -> tuple[list[str], str]:
    return _train(env, env.tmp / "run", "--set", "train.lr=-1"), "train.lr must be > 0"


def c_train_epochs_zero(env: Env) -> tuple[list[str], str]:
    return _train(env, env.tmp / "run", "--set", "train.epochs=0"), "train.epochs must be >= 1"


def c_stage2_epochs_zero(env: Env) -> tuple[list[str], str]:
    return _stage2(env, env.tmp / "run2", "--set", "stage2.epochs=0"), "stage2.epochs must be >= 1"


def c_train_device_tpu_config(env: Env) -> tuple[list[str], str]:
    argv = _train(env, env.tmp / "run", "--set", "train.device=tpu")
    argv.remove("--device"), argv.remove("cpu")
    return argv, "train.device='tpu' is not one of"


def c_train_device_tpu_flag(env: Env) -> tuple[list[str], str]:
    argv = _train(env, env.tmp / "run")
    argv[argv.index("--device") + 1] = "tpu"
    return argv, "device 'tpu': not one of"


def c_train_device_unavailable(env: Env) -> tuple[list[str], str]:
    argv = _train(env, env.tmp / "run")
    argv[argv.index("--device") + 1] = "cuda:99"
    return argv, "device 'cuda:99' requested but"


def c_bank_features_string(env: Env) -> tuple[list[str], str]:
    env.bank = env.tmp / "str_bank.pt"
    torch.save({"format": "pbip-bank-v1", "features": "not a tensor", "classes": ["a"]}, env.bank)
    return _train(env, env.tmp / "run"), "str_bank.pt: 'features' must be a non-empty float tensor"


def c_bank_official_features_string(env: Env) -> tuple[list[str], str]:
    env.bank = env.tmp / "str_bank.pkl"
    env.bank.write_bytes(pickle.dumps({"features": "not an array", "k_list": [1], "class_order": ["a"]}))
    return _train(env, env.tmp / "run"), "str_bank.pkl: 'features' must be a float array"


def c_run_dry_run_missing_data(env: Env) -> tuple[list[str], str]:
    grid = env.tmp / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "profile": "smoke", "datasets": [str(env.tmp / "absent")],
                                    "methods": ["cam"], "seeds": [0], "stage2": False, "splits": ["val"]}))
    return (["run", str(grid), "--dry-run", "--results", str(env.tmp / "results")],
            "1 requirement missing (listed above), first: dataset")


#: case id -> (issue item, what the case sets up and returns: argv and the message fragment)
CASES: dict[str, tuple[str, Callable[[Env], tuple[list[str], str]]]] = {
    "bank-plain-pickle-runs-code": ("1 security", c_bank_pickle_runs_code),
    "bank-torch-file-runs-code": ("1 security", c_bank_torch_file_runs_code),
    "stage1-last.pt-runs-code (train --resume)": ("1 security", c_stage1_last_runs_code),
    "stage1-best.pt-runs-code (pseudo --run)": ("1 security", c_stage1_best_runs_code),
    "stage2-last.pt-runs-code (stage2 --resume)": ("1 security", c_stage2_last_runs_code),
    "train-16bit-image": ("2 silent wrong data", c_train_16bit_image),
    "train-rerun-partial-without-resume": ("3 silent loss", c_train_rerun_partial),
    "train-rerun-finished-without-resume": ("3 silent loss", c_train_rerun_finished),
    "stage2-rerun-partial-without-resume": ("3 silent loss", c_stage2_rerun_partial),
    "train-folder-claimed-by-live-process": ("3 silent loss", c_train_claimed),
    "stage2-folder-claimed-by-live-process": ("3 silent loss", c_stage2_claimed),
    "train-val-mask-out-of-range": ("4 late failure", c_train_bad_val_mask),
    "stage2-test-mask-wrong-size": ("4 late failure", c_stage2_bad_test_mask),
    "train-resume-truncated-last.pt": ("5 traceback", c_train_resume_truncated_last),
    "train-resume-empty-last.pt": ("5 traceback", c_train_resume_empty_last),
    "train-out-is-a-file": ("5 traceback", c_train_out_is_file),
    "train-out-under-a-file (unwritable, even for root)": ("5 traceback", c_train_out_under_file),
    "pseudo-out-is-a-file": ("5 traceback", c_pseudo_out_is_file),
    "stage2-out-is-a-file": ("5 traceback", c_stage2_out_is_file),
    "bank-out-is-a-folder": ("5 traceback", c_bank_out_is_folder),
    "evaluate-json-is-a-folder": ("5 traceback", c_evaluate_json_is_folder),
    "train.lr=-1": ("5 traceback", c_train_lr_negative),
    "train.device=tpu": ("5 traceback", c_train_device_tpu_config),
    "--device tpu": ("5 traceback", c_train_device_tpu_flag),
    "--device cuda:99 (unavailable)": ("5 traceback", c_train_device_unavailable),
    "bank-features-is-a-string": ("5 traceback", c_bank_features_string),
    "official-bank-features-is-a-string": ("5 traceback", c_bank_official_features_string),
    "train.epochs=0": ("6 questionable success", c_train_epochs_zero),
    "stage2.epochs=0": ("6 questionable success", c_stage2_epochs_zero),
    "run-dry-run-with-missing-data": ("6 questionable success", c_run_dry_run_missing_data),
    "evaluate-pred-with-extra-files": ("6 questionable success", c_evaluate_extra_files),
}
_held: list[claims.RunClaim] = []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, base, tmp_path, capsys, monkeypatch):
    data, bank, run = base
    env = Env(tmp_path, shutil.copytree(data, tmp_path / "data"), bank, run, tmp_path / "MARKER")
    argv, fragment = CASES[case][1](env)
    kept = {p: p.read_bytes() for p in env.keep}
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    try:
        rc = cli(argv)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith(f"pbip {argv[0]}: error: ")]
        assert rc == 2, err[-2000:]
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert fragment in lines[0], lines[0]
        assert not env.marker.exists(), "the malicious pickle ran its command"
        assert snapshot(tmp_path) == before, "the failed command wrote, changed or deleted files"
        for p, content in kept.items():
            assert p.read_bytes() == content, p
    finally:
        while _held:
            _held.pop().release()


def test_the_malicious_pickles_are_real():
    """Control for the security cases: the crafted files do run their command under the loader the code used before
    the restructuring (``torch.load(path, weights_only=False)`` in 1b312aa's train.py and stage2.py)."""
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"pbip-evil-control-{os.getpid()}"
    marker.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save({"classnet": Evil(marker), "epoch": 1}, buf)
    buf.seek(0)
    torch.load(buf, map_location="cpu", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps({"features": Evil(marker)}))
    assert marker.exists()
    marker.unlink()


# ---------------------------------------------------------------------------------------------------- PermissionError
def test_permission_errors_are_one_line(base, tmp_path, capsys, monkeypatch):
    """A file-system error the user can fix becomes ``pbip <cmd>: error: PATH: reason`` (exit 2) wherever it
    happens; this patches a command to raise one, since root (the test machine's user) ignores permissions."""
    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/where/run")

    monkeypatch.setattr(pipeline_cli, "train_main", denied)
    data, bank, _ = base
    rc = cli(["train", "--data", str(data), "--bank", str(bank), "--out", str(tmp_path / "r"), *SMOKE])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "pbip train: error: /some/where/run: Permission denied"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions; the 'under a file' case and "
                                               "test_permission_errors_are_one_line cover this as root")
def test_unwritable_output_folder_as_unprivileged_user(base, tmp_path, capsys):
    data, bank, _ = base
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc = cli(["train", "--data", str(data), "--bank", str(bank), "--out", str(locked / "run"), *SMOKE])
    finally:
        locked.chmod(0o755)
    assert rc == 2 and "no permission to write in" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- image modes
def _save(im: Image.Image, path: Path, fmt: str = "PNG", **kw) -> Path:
    im.save(path, format=fmt, **kw)
    return path


_RGB = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def _img_rgb(p):
    return _save(Image.fromarray(_RGB), p), _RGB


def _img_rgb48(p):                                       # 16 bits per channel: read as the high byte
    arr16 = _RGB.astype(np.uint16) * 257 + 3
    p.write_bytes(png_bytes(arr16, 16, 2))
    return p, _RGB


def _img_rgba_opaque(p):
    return _save(Image.fromarray(np.dstack([_RGB, np.full(_RGB.shape[:2], 255, np.uint8)])), p), _RGB


def _img_rgba_transparent(p):
    a = np.full(_RGB.shape[:2], 255, np.uint8)
    a[0, 0] = 0
    return _save(Image.fromarray(np.dstack([_RGB, a])), p), "transparent"


def _palette_image(transparency=None):
    idx = (np.arange(30).reshape(6, 5) % 3).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([200, 10, 20, 10, 200, 20, 10, 20, 200])
    rgb = np.array([[200, 10, 20], [10, 200, 20], [10, 20, 200]], np.uint8)[idx]
    return im, rgb


def _img_p(p):
    im, rgb = _palette_image()
    return _save(im, p), rgb


def _img_p_trns_unused(p):
    im, rgb = _palette_image()
    return _save(im, p, transparency=7), rgb              # index 7 is not used: every pixel is opaque


def _img_p_trns_used(p):
    im, _ = _palette_image()
    return _save(im, p, transparency=1), "transparent"


def _img_pa_opaque(p):
    im, rgb = _palette_image()
    return _save(im.convert("PA"), p, "TIFF"), rgb


def _img_ycbcr(p):
    im = Image.fromarray(_RGB).convert("YCbCr")
    return _save(im, p, "TIFF"), np.asarray(im.convert("RGB"))


def _img_l(p):
    return _save(Image.fromarray(_RGB[..., 0]), p), "8-bit grayscale image (mode L)"


def _img_la(p):
    return _save(Image.fromarray(_RGB[..., :2].copy(), mode="LA"), p), "8-bit grayscale with alpha image (mode LA)"


def _img_1(p):
    return _save(Image.fromarray(_RGB[..., 0] > 128), p), "1-bit black-and-white image (mode 1)"


def _img_i16(p):
    write_i16(p, 3000, (6, 5))
    return p, "16-bit grayscale image (mode I;16) (Pillow would read it as all white)"


def _img_i32(p):
    return _save(Image.fromarray(np.full((6, 5), 70000, np.int32)), p, "TIFF"), "32-bit integer grayscale image (mode I) (Pillow would clip"


def _img_f(p):
    return _save(Image.fromarray(np.full((6, 5), 0.5, np.float32)), p, "TIFF"), "32-bit float grayscale image (mode F)"


def _img_cmyk(p):
    return _save(Image.fromarray(_RGB).convert("CMYK"), p, "TIFF"), "CMYK image"


def _img_lab(p):
    return _save(Image.fromarray(_RGB).convert("LAB"), p, "TIFF"), "unsupported image mode LAB"


RGB_CASES = {"RGB": _img_rgb, "RGB 16-bit/channel": _img_rgb48, "RGBA opaque": _img_rgba_opaque,
             "RGBA transparent": _img_rgba_transparent, "P": _img_p, "P tRNS unused": _img_p_trns_unused,
             "P tRNS used": _img_p_trns_used, "PA opaque": _img_pa_opaque, "YCbCr": _img_ycbcr, "L": _img_l,
             "LA": _img_la, "1": _img_1, "I;16": _img_i16, "I": _img_i32, "F": _img_f, "CMYK": _img_cmyk,
             "LAB": _img_lab}


@pytest.mark.parametrize("case", list(RGB_CASES))
def test_read_rgb_handles_or_rejects_every_mode(case, tmp_path):
    path, expected = RGB_CASES[case](tmp_path / "img.png")      # every reader lists *.png, whatever the content
    if isinstance(expected, str):
        with pytest.raises(DataError) as e:
            read_rgb(path)
        assert str(e.value).startswith(f"{path}: ") and expected in str(e.value), str(e.value)
    else:
        out = read_rgb(path)
        assert out.dtype == np.uint8 and out.shape == expected.shape
        assert np.array_equal(out, expected)


_IDX = (np.arange(30).reshape(6, 5) % 5).astype(np.uint8)


def _mask_p(p):
    im = Image.fromarray(_IDX, mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9, 255, 255, 255])
    return _save(im, p), _IDX                             # the indices, not the palette colours


def _mask_l(p):
    return _save(Image.fromarray(_IDX, mode="L"), p), _IDX


def _mask_i16_small(p):
    return _save(Image.fromarray(_IDX.astype(np.uint16)), p), _IDX


def _mask_i16_large(p):
    return _save(Image.fromarray(_IDX.astype(np.uint16) * 250), p), "mask holds values 0..1000"


def _mask_i32(p):
    return _save(Image.fromarray(_IDX.astype(np.int32)), p, "TIFF"), _IDX


def _mask_rgb(p):
    return _save(Image.fromarray(np.dstack([_IDX] * 3)), p), "a colour image (mode RGB)"


def _mask_rgba(p):
    return _save(Image.fromarray(np.dstack([_IDX] * 4)), p), "a colour image (mode RGBA)"


def _mask_la(p):
    return _save(Image.fromarray(np.dstack([_IDX] * 2), mode="LA"), p), "a colour image (mode LA)"


def _mask_1(p):
    return _save(Image.fromarray(_IDX > 2), p), "mode 1"


def _mask_f(p):
    return _save(Image.fromarray(_IDX.astype(np.float32)), p, "TIFF"), "mode F"


MASK_CASES = {"P": _mask_p, "L": _mask_l, "I;16 in 0..255": _mask_i16_small, "I;16 over 255": _mask_i16_large,
              "I in 0..255": _mask_i32, "RGB": _mask_rgb, "RGBA": _mask_rgba, "LA": _mask_la, "1": _mask_1,
              "F": _mask_f}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_read_mask_handles_or_rejects_every_mode(case, tmp_path):
    path, expected = MASK_CASES[case](tmp_path / "mask.png")
    if isinstance(expected, str):
        with pytest.raises(DataError) as e:
            read_mask(path)
        assert str(e.value).startswith(f"{path}: ") and expected in str(e.value), str(e.value)
    else:
        out = read_mask(path)
        assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_data_check_reports_the_same_image_problems(base, tmp_path, capsys):
    data = shutil.copytree(base[0], tmp_path / "data")
    bad_img = sorted((data / "train").glob("*.png"))[1]
    write_i16(bad_img, 50000)
    bad_mask = min((data / "val" / "mask").glob("*.png"))
    Image.fromarray(np.dstack([read_mask(bad_mask)] * 3)).save(bad_mask)
    problems = check_dataset(data)
    assert any(p.startswith(f"{bad_img}: 16-bit grayscale image (mode I;16)") for p in problems), problems
    assert any(p.startswith(f"{bad_mask}: mask must be a single-channel") for p in problems), problems
    assert cli(["data", "check", str(data)]) == 2
    out = capsys.readouterr().out
    assert f"{bad_img}: 16-bit grayscale" in out and f"{bad_mask}: mask must be" in out
    # the check before a run finds the same first problem and counts the rest
    with pytest.raises(DataError, match=r"16-bit grayscale.*\(and 1 more problem; `pbip data check"):
        preflight_dataset(data)


def test_the_ebhi_importer_converts_images_through_the_same_policy(tmp_path):
    """EBHI-Seg images are re-encoded as RGB PNG: a palette image converts, a 16-bit one is refused (it used to
    become all white); a 16-bit label is refused instead of clipped."""
    label = _save(Image.fromarray(np.full((6, 5), 255, np.uint8)), tmp_path / "label.png")
    p_img, rgb = _img_p(tmp_path / "p.png")
    img, mask, _ = ebhi.convert_pair(0, p_img, label)
    ebhi._write_image(img, p_img, tmp_path / "out.png")
    assert np.array_equal(read_rgb(tmp_path / "out.png"), rgb) and (mask == 0).all()
    i16, _ = _img_i16(tmp_path / "i16.png")
    img, _, _ = ebhi.convert_pair(0, i16, label)
    with pytest.raises(DataError, match=r"i16.png: 16-bit grayscale image \(mode I;16\)"):
        ebhi._write_image(img, i16, tmp_path / "out2.png")
    assert not (tmp_path / "out2.png").exists()
    with pytest.raises(DataError, match=r"label16.png: label of mode I;16"):
        ebhi.convert_pair(0, p_img, _img_i16(tmp_path / "label16.png")[0])


# ---------------------------------------------------------------------------------------------------- conversion
def test_legacy_checkpoint_converts_once_and_then_loads_safely(tmp_path, capsys):
    """A checkpoint as the pre-restructuring code wrote it (numpy RNG state, numpy scalars: a full pickle) is refused
    by the safe loader with the way out; `pbip checkpoint convert` rewrites it; the result loads safely and equal."""
    path = tmp_path / "last.pt"
    state = rng_state()
    weights = {"w": torch.randn(3, 2)}
    torch.save({"classnet": weights, "epoch": 2, "best": {"miou": np.float64(0.25)}, "rng": state}, path)
    with pytest.raises(DataError, match=r"refused to load.*pbip checkpoint convert"):
        load_checkpoint(path)
    assert cli(["checkpoint", "convert", str(path)]) == 0
    assert "converted" in capsys.readouterr().out
    ck = load_checkpoint(path)
    assert torch.equal(ck["classnet"]["w"], weights["w"]) and ck["epoch"] == 2 and ck["best"]["miou"] == 0.25
    assert torch.equal(ck["rng"]["torch"], state["torch"])
    assert np.array_equal(ck["rng"]["numpy"][1], state["numpy"][1]) and ck["rng"]["python"] == state["python"]
    before = path.read_bytes()
    assert cli(["checkpoint", "convert", str(path)]) == 0
    assert "already in the safe format" in capsys.readouterr().out and path.read_bytes() == before
    # a corrupt file is a one-line error there too
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    assert cli(["checkpoint", "convert", str(tmp_path / "bad.pt")]) == 2


# ---------------------------------------------------------------------------------------------------- claims
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_claim(folder: Path, age_s: float = 0.0, **owner) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"pid": 1, "host": socket.gethostname(), "command": "pbip train (fake)", "token": "x" * 32, **owner}
    path = folder / claims.CLAIM_NAME
    path.write_text(json.dumps(rec))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_claim_refuses_a_live_owner_and_releases(tmp_path):
    run = tmp_path / "run"
    with claims.claim_run(run, "first") as held:
        assert (run / claims.CLAIM_NAME).is_file() and held.owner["pid"] == os.getpid()
        with pytest.raises(RunClaimedError, match=rf"run: in use by pid {os.getpid()} on host"):
            claims.acquire(run, "second")
    assert not run.exists()                        # created by the claim, left empty: removed again


@pytest.mark.parametrize("owner,age,reason", [
    ({"pid": None}, 0, "process .* on this host is gone"),                         # pid filled in below
    ({"proc_start": -1.0}, 0, "now belongs to another process"),                   # pid reused (this process)
    ({"host": "elsewhere.invalid"}, 10_000, "no heartbeat from host elsewhere.invalid"),
])
def test_stale_claims_are_taken_over_with_a_message(tmp_path, capsys, owner, age, reason):
    owner = dict(owner)
    if "pid" in owner:
        owner["pid"] = _dead_pid()
    else:
        owner["pid"] = os.getpid()
    run = tmp_path / "run"
    _fake_claim(run, age, **owner)
    with claims.claim_run(run, "new owner") as held:
        assert json.loads((run / claims.CLAIM_NAME).read_text())["token"] == held.owner["token"]
    err = capsys.readouterr().err
    assert "taking over the stale claim" in err
    assert __import__("re").search(reason, err), err


def test_a_recent_claim_from_another_host_is_live(tmp_path):
    _fake_claim(tmp_path / "run", 5, host="elsewhere.invalid", pid=123)
    with pytest.raises(RunClaimedError, match="pid 123 on host elsewhere.invalid"):
        claims.acquire(tmp_path / "run")


def test_heartbeat_refreshes_and_notices_a_lost_claim(tmp_path, capsys):
    run = tmp_path / "run"
    held = claims.acquire(run, heartbeat_s=0.05)
    path = run / claims.CLAIM_NAME
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert path.stat().st_mtime > time.time() - 5          # refreshed
    path.unlink()
    time.sleep(0.3)
    assert held.lost and "removed or taken over" in capsys.readouterr().err
    held.release()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a pbip run folder"):
        claims.empty_run_folder(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_exclude_each_other(base, tmp_path):
    data, bank, _ = base
    with pytest.raises(SystemExit) as e:
        cli(["train", "--data", str(data), "--bank", str(bank), "--out", str(tmp_path / "r"), "--resume",
             "--overwrite"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------- the grid runner
def _grid(tmp_path: Path, seeds=(0, 1, 2)):
    (tmp_path / "ds").mkdir(exist_ok=True)
    return load_grid({"name": "g", "profile": "smoke", "datasets": [str(tmp_path / "ds")], "methods": ["cam"],
                      "seeds": list(seeds), "stage2": False, "splits": ["val"]})


def _ok_step(spec, run_dir):
    return {"stage1.val.miou": 0.5}


def test_a_run_claimed_by_a_live_process_is_skipped_without_a_row(tmp_path, capsys):
    g = _grid(tmp_path)
    specs = plan(g)
    results = tmp_path / "results"
    calls = []
    with claims.claim_run(results / "runs" / specs[1].hash, "another pbip run"):
        df = ex.run_grid(g, results, step=lambda s, d: calls.append(s.hash) or _ok_step(s, d))
    assert calls == [specs[0].hash, specs[2].hash]
    assert sorted(df["hash"]) == sorted([specs[0].hash, specs[2].hash])         # no row for the skipped run
    captured = capsys.readouterr()
    assert f"{specs[1].label} skipped" in captured.err and "1 run(s) skipped" in captured.out


def test_run_grid_can_wait_for_a_run_another_process_holds(tmp_path, capsys):
    g = _grid(tmp_path)
    specs = plan(g)
    results = tmp_path / "results"
    held = claims.acquire(results / "runs" / specs[1].hash, "another pbip run")
    timer = threading.Timer(0.5, held.release)                 # the other process gives the run up (e.g. fails)
    timer.start()
    calls = []
    df = ex.run_grid(g, results, step=lambda s, d: calls.append(s.hash) or _ok_step(s, d), wait=True, poll_s=0.1)
    timer.join()
    assert calls == [specs[0].hash, specs[2].hash, specs[1].hash]
    assert len(df) == 3 and (df["status"] == "ok").all()
    assert "waiting for 1 run(s) held by another process" in capsys.readouterr().out


def test_a_failed_run_never_replaces_an_ok_row(tmp_path):
    """A run finished ok is not executed again by a later (failing) attempt: its row.json stays ok."""
    g = _grid(tmp_path, seeds=[0])
    spec = plan(g)[0]
    ex.run_grid(g, tmp_path / "results", step=_ok_step)

    def failing(s, d):
        raise RuntimeError("late failure")

    row = ex.execute(spec, tmp_path / "results", step=failing)
    assert row["status"] == "skipped"
    assert ex.read_row(tmp_path / "results", spec.hash)["status"] == "ok"


def test_a_failed_rerun_keeps_the_ok_row(tmp_path, capsys):
    """--rerun-stale (or retraining a published run) that fails returns the failure but keeps the finished row."""
    g = _grid(tmp_path, seeds=[0])
    spec = plan(g)[0]
    ex.run_grid(g, tmp_path / "results", step=_ok_step)
    before = (tmp_path / "results" / "runs" / spec.hash / "row.json").read_bytes()

    def failing(s, d):
        raise RuntimeError("late failure")

    row = ex.execute(spec, tmp_path / "results", step=failing, rerun=True)
    assert row["status"] == "failed" and "late failure" in row["error"]
    assert (tmp_path / "results" / "runs" / spec.hash / "row.json").read_bytes() == before
    assert "earlier finished row is kept" in capsys.readouterr().err


def test_a_run_finished_by_another_process_is_not_run_again(tmp_path):
    g = _grid(tmp_path, seeds=[0])
    spec = plan(g)[0]
    ex.run_grid(g, tmp_path / "results", step=_ok_step)
    calls = []
    row = ex.execute(spec, tmp_path / "results", step=lambda s, d: calls.append(1) or {})
    assert row["status"] == "skipped" and calls == []
    assert ex.load_results(tmp_path / "results" / "g.csv").iloc[0]["status"] == "ok"


def slow_logging_step(spec, run_dir):
    """For the two-process test: log the run (O_APPEND, one line) and take a while."""
    with open(run_dir.parents[1] / "executions.log", "a") as fh:
        fh.write(f"{spec.hash} {os.getpid()}\n")
    time.sleep(1.0)
    return {"stage1.val.miou": 0.5}


def test_two_pbip_run_processes_execute_each_run_once(tmp_path):
    g = _grid(tmp_path, seeds=[0, 1, 2, 3])
    results = tmp_path / "results"
    code = ("import sys; from test_reliability import slow_logging_step, _grid; from pathlib import Path; "
            "from pbip_core.experiments.runner import run_grid; "
            "run_grid(_grid(Path(sys.argv[1]), seeds=[0, 1, 2, 3]), Path(sys.argv[1]) / 'results', "
            "step=slow_logging_step)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    executed = [ln.split()[0] for ln in (results / "executions.log").read_text().splitlines()]
    assert sorted(executed) == sorted(s.hash for s in plan(g)), executed          # each run exactly once
    df = ex.load_results(results / "g.csv")
    assert len(df) == 4 and df["hash"].is_unique and (df["status"] == "ok").all()
    assert not list(results.glob(f"runs/*/{claims.CLAIM_NAME}"))                 # every claim released


# ---------------------------------------------------------------------------------------------------- real runs
TRAIN_FAST = ["--set", "train.val_every=0", "--set", "train.batch_size=8"]


@pytest.mark.slow
def test_overwrite_starts_a_partial_run_over(base, tmp_path, capsys):
    data, bank, _ = base
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--bank", str(bank), "--out", str(run), *SMOKE, *TRAIN_FAST,
            "--set", "train.epochs=2"]
    assert cli(argv) == 0
    (run / "metrics.json").unlink()                                          # now a partial run
    (run / "stray.txt").write_text("from the old run")
    assert cli(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli([*argv, "--overwrite"]) == 0
    assert (run / "metrics.json").is_file() and not (run / "stray.txt").exists()
    assert not (run / claims.CLAIM_NAME).exists()


def _pbip(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`pbip ...` in a fresh process with one thread (so every run computes with the same thread count)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pbip_core", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_kill_9_then_resume_takes_over_the_claim_and_matches_an_uninterrupted_run(base, tmp_path):
    data, bank, _ = base
    run, ref = tmp_path / "killed", tmp_path / "uninterrupted"
    args = ["--data", str(data), "--bank", str(bank), *SMOKE, *TRAIN_FAST, "--set", "train.epochs=12"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pbip_core", "train", "--out", str(run), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and (run / "last.pt").is_file()
    assert not (run / "metrics.json").exists() and (run / claims.CLAIM_NAME).is_file()   # the dead owner's claim
    again = _pbip("train", "--out", str(run), *args)                                      # forgot --resume
    assert again.returncode == 2 and "taking over the stale claim" in again.stderr
    assert "holds a partial run" in again.stderr and "--resume" in again.stderr
    resumed = _pbip("train", "--out", str(run), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = _pbip("train", "--out", str(ref), *args)
    assert full.returncode == 0, full.stderr[-3000:]
    a = load_checkpoint(ref / "last.pt")["classnet"]
    b = load_checkpoint(run / "last.pt")["classnet"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)      # bit-identical on CPU
    assert json.loads((run / "metrics.json").read_text())["steps"] == 12
