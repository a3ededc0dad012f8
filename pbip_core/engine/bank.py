"""Building the image bank of a dataset folder (sec. 3.2), and bank files.

:func:`single_class_pool` runs steps 1-3 on a training folder (single-class selection, white filter, encoding with a
feature cache keyed by encoder and file contents); :func:`build_bank` adds steps 4-5
(:func:`pbip_core.method.bank.build_prototypes`) and returns a :class:`~pbip_core.method.bank.PrototypeBank`.

Bank files: :func:`save_bank` writes a torch file holding only tensors and plain data (``format: pbip-bank-v1``);
:func:`load_bank` reads it with ``weights_only=True``, or reads the official repository's prototype pickle with a
restricted unpickler that refuses anything but tensors and numpy arrays.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import list_train, load_info
from ..errors import DataError
from ..io import atomic_torch_save, read_rgb, refused_global
from ..method.bank import BankSteps, PrototypeBank, build_prototypes, select_single_class, white_fraction
from ..nets.encoders import get_encoder


# ---------------------------------------------------------------------- steps 1-3
def encode_images(
    paths: Sequence[Path],
    encoder: Any,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, np.ndarray]:
    """Encode image files with ``encoder`` -> features (M, d) and white fractions (M,), cached by encoder + data hash."""
    key = _data_hash(paths, f"{getattr(encoder, 'name', type(encoder).__name__)}@{getattr(encoder, 'input_size', '')}"
                            f"@{getattr(encoder, 'pretrained_source', '')}")   # random and pretrained weights differ
    cache = Path(cache_dir) / f"bank-features-{key}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        obj = torch.load(cache, map_location="cpu", weights_only=True)
        return obj["features"], obj["white"].numpy()
    feats, whites = [], []
    for s in tqdm(range(0, len(paths), batch_size), desc="encode bank images", disable=not progress, unit="batch"):
        arrs = [read_rgb(p) for p in paths[s:s + batch_size]]
        whites.extend(white_fraction(a) for a in arrs)
        x = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrs]).float().div(255).to(device)
        with torch.no_grad():
            feats.append(encoder.encode(x).float().cpu())
    out = torch.cat(feats) if feats else torch.zeros(0, getattr(encoder, "dim", 0))
    white_arr = np.asarray(whites, dtype=np.float64)
    if cache is not None:
        atomic_torch_save({"features": out, "white": torch.from_numpy(white_arr)}, cache)
    return out, white_arr


def _data_hash(paths: Sequence[Path], encoder_name: str) -> str:
    h = hashlib.sha256(encoder_name.encode())
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()[:16]


@dataclass
class Pool:
    """Single-class training images of a dataset, encoded (sec. 3.2 steps 1-3), in file order.

    ``paths`` (M,), ``label`` (M,) class index, ``features`` (M, d), ``white`` (M,) white-pixel share,
    ``eligible`` (M,) bool: kept by the white filter (``white <= white_threshold``; every image when the filter is off).
    """

    paths: list[Path]
    label: np.ndarray
    features: torch.Tensor
    white: np.ndarray
    eligible: np.ndarray
    classes: tuple[str, ...]
    white_threshold: float
    n_train: int
    with_class: np.ndarray            # (N,) training images whose label contains the class
    encoder: str = ""
    encoder_source: str = ""

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]

    def members(self, n: int) -> np.ndarray:
        """Indices (into the pool) of class ``n``'s eligible images."""
        return np.flatnonzero((self.label == n) & self.eligible)

    def counts(self) -> pd.DataFrame:
        """Per class: training images with the class, single-class ones, dropped as white, left for clustering."""
        n = len(self.classes)
        single = np.bincount(self.label, minlength=n)
        kept = np.bincount(self.label[self.eligible], minlength=n)
        return pd.DataFrame({"images with class": self.with_class, "single-class": single,
                             "dropped as white": single - kept, "eligible for the bank": kept},
                            index=pd.Index(self.classes, name="class"))


def single_class_pool(data_root: str | Path, bank_cfg: Any, cache_dir: str | Path | None = None,
                      encoder: Any = None, device: str = "cpu", progress: bool = False) -> Pool:
    """Steps 1-3 of the bank on a training folder: select single-class images, encode them, apply the white filter.

    ``bank_cfg`` is a :class:`~pbip_core.config.BankConfig` (encoder, encoder_size, white_threshold, selection; the
    official ``centroid`` selection has no white filter). Features are cached in ``cache_dir``.
    """
    info = load_info(data_root)
    items = list_train(data_root, info)
    labels = np.stack([lab for _, lab in items])                            # (T, N) image-level labels
    per_class = select_single_class(labels)                                 # step 1
    idx = np.concatenate(per_class)
    label = np.concatenate([np.full(len(m), n) for n, m in enumerate(per_class)]).astype(int)
    order = np.argsort(idx, kind="stable")                                  # file order
    idx, label = idx[order], label[order]
    if encoder is None:
        encoder = get_encoder(bank_cfg.encoder, device=device, input_size=bank_cfg.encoder_size or None,
                              random_init=getattr(bank_cfg, "random_init", False))
    paths = [items[i][0] for i in idx]
    feats, white = encode_images(paths, encoder, bank_cfg.batch_size, cache_dir, device, progress)   # step 3
    white_filter = bank_cfg.selection != "centroid"                         # the official code has no white filter
    eligible = white <= bank_cfg.white_threshold if white_filter else np.ones(len(paths), dtype=bool)   # step 2
    return Pool(paths, label, feats, white, eligible, tuple(info.classes), float(bank_cfg.white_threshold),
                len(items), labels.sum(axis=0).astype(int), getattr(encoder, "name", bank_cfg.encoder),
                getattr(encoder, "pretrained_source", ""))


def pool_prototypes(pool: Pool, bank_cfg: Any) -> BankSteps:
    """Steps 4-5 on a pool with the configuration's K, N_K, selection and K-means settings."""
    return build_prototypes(pool.features, [pool.members(n) for n in range(len(pool.classes))], bank_cfg.k,
                            bank_cfg.nk, bank_cfg.selection, bank_cfg.seed, bank_cfg.kmeans_iters,
                            bank_cfg.kmeans_restarts, pool.classes)


def bank_from_steps(pool: Pool, steps: BankSteps, bank_cfg: Any, data_root: str | Path = "") -> PrototypeBank:
    """The :class:`PrototypeBank` of a pool and its steps 4-5, with the counts of every step in ``info``."""
    n = len(pool.classes)
    single = np.bincount(pool.label, minlength=n)
    eligible = np.array([len(pool.members(c)) for c in range(n)])
    stats = {"single_class": single.tolist(), "eligible": eligible.tolist(),
             "dropped_white": (single - eligible).tolist()}
    return PrototypeBank(
        steps.prototypes, list(pool.classes), encoder=bank_cfg.encoder, members=steps.members(pool.names),
        info={"data_root": str(data_root), "k": bank_cfg.k, "nk": bank_cfg.nk, "selection": bank_cfg.selection,
              "white_threshold": bank_cfg.white_threshold, "seed": bank_cfg.seed, "stats": stats,
              "encoder_source": pool.encoder_source},
    )


def build_bank(data_root: str | Path, cfg: Any, cache_dir: str | Path | None = None, device: str = "cpu",
               encoder: Any = None, progress: bool = True) -> PrototypeBank:
    """The image bank of a dataset folder (sec. 3.2, steps 1-5). ``cfg`` is a :class:`~pbip_core.config.BankConfig`."""
    pool = single_class_pool(data_root, cfg, cache_dir, encoder, device, progress)
    return bank_from_steps(pool, pool_prototypes(pool, cfg), cfg, data_root)


# ---------------------------------------------------------------------- files
BANK_FORMAT = "pbip-bank-v1"
#: The official repository's prototype file (BCSS-WSSS, K = 3, MIT licence), shipped with the package.
OFFICIAL_PROTOTYPES = Path(__file__).resolve().parents[1] / "data" / "assets" / "official" / "official_bcss_prototypes.pkl"


def save_bank(bank: PrototypeBank, path: str | Path) -> None:
    """Write a bank as tensors and plain data only (readable with ``torch.load(weights_only=True)``)."""
    atomic_torch_save({"format": BANK_FORMAT, "features": bank.features.cpu(), "classes": list(bank.classes),
                       "encoder": bank.encoder, "members": bank.members, "info": bank.info}, path)


def load_bank(path: str | Path) -> PrototypeBank:
    """Read a bank saved by :func:`save_bank`, or the official repository's prototype pickle.

    The official file is a plain pickle of ``{"features": (sum K, d) unit rows, "k_list", "class_order",
    "cumsum_k"}``; it is read with a restricted unpickler and reshaped to (N, K, d) (equal K per class required).
    Nothing in a bank file can run code: a torch file is read with ``weights_only=True``, a plain pickle with an
    unpickler that only knows tensors and arrays. Every problem is a DataError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prototype bank not found (build one with `pbip bank --data DIR --out {path}`)")
    if zipfile.is_zipfile(path):                  # a torch file (save_bank): tensors and plain data only
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise DataError(f"{path}: refused to load: the bank holds Python objects other than tensors and plain "
                            f"data ({refused_global(e)})") from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: corrupt or truncated bank file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); rebuild it with `pbip bank`") from None
    else:                                         # the official repository's plain pickle
        obj = _load_official_pickle(path)
    if not isinstance(obj, dict) or "features" not in obj:
        raise DataError(f"{path}: not a prototype bank (expected a dict with 'features')")
    if obj.get("format") == BANK_FORMAT:
        feats = obj["features"]
        if not isinstance(feats, torch.Tensor) or feats.ndim != 3 or not feats.is_floating_point() \
                or 0 in feats.shape:
            raise DataError(f"{path}: 'features' must be a non-empty float tensor (N classes, K, d), found "
                            f"{_describe(feats)}")
        classes = obj.get("classes")
        if not isinstance(classes, (list, tuple)) or len(classes) != feats.shape[0]:
            raise DataError(f"{path}: 'classes' must list one name per prototype class ({feats.shape[0]}), found "
                            f"{_describe(classes)}")
        return PrototypeBank(feats.float(), [str(c) for c in classes], str(obj.get("encoder", "unknown")),
                             obj.get("members", []), obj.get("info", {}))
    return _from_official(obj, path)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"{type(value).__name__} {str(value)[:40]!r}"


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch", "FloatStorage"),
    ("torch.storage", "_load_from_bytes"), ("collections", "OrderedDict"), ("torch", "Size"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
    ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "float32"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or module.startswith("numpy.dtypes"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an untrusted pickle")


def _load_official_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh).load()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read prototype file ({type(e).__name__}: {e})") from None


def _from_official(obj: dict, path: Path) -> PrototypeBank:
    raw = obj["features"]
    is_float = (isinstance(raw, torch.Tensor) and raw.is_floating_point()) or \
        (isinstance(raw, np.ndarray) and raw.dtype.kind == "f")
    if not is_float or raw.ndim != 2 or 0 in raw.shape:
        raise DataError(f"{path}: 'features' must be a float array of prototype rows (sum K, d), found "
                        f"{_describe(raw)}")
    feats = torch.as_tensor(raw).float()
    try:
        k_list = [int(k) for k in obj.get("k_list", [])]
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'k_list' must be a list of integers, found {_describe(obj.get('k_list'))}") from None
    classes = [str(c) for c in obj.get("class_order", [])]
    if not k_list or len(set(k_list)) != 1 or sum(k_list) != feats.shape[0]:
        raise DataError(f"{path}: k_list {k_list} does not split {feats.shape[0]} prototype rows into equal K per class")
    n, k = len(k_list), k_list[0]
    if len(classes) != n:
        classes = [f"class{i}" for i in range(n)]
    return PrototypeBank(feats.reshape(n, k, -1), classes, encoder="official-pickle",
                         info={"source": str(path), "note": "official PBIP repository prototypes (K-means centres)"})
