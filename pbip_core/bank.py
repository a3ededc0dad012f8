"""The image bank and its prototypes (sec. 3.2, eq. 1).

The bank is built from the training set alone, with image-level labels:

1. keep the training images whose label vector has exactly one class (``select_single_class``);
2. drop those that are mostly white glass (``white_fraction`` > ``bank.white_threshold``; a pixel is white when
   all of R, G, B exceed 220, i.e. bright and unsaturated);
3. encode every remaining image with the frozen encoder phi_e (features cached on disk by encoder + data hash);
4. per class, spherical K-means with the cosine distance of eq. 1, ``D(x1, x2) = 1 - cos(phi(x1), phi(x2))``;
5. per cluster, keep the ``N_K`` images nearest the centre; the prototype is the mean feature of that sub-bank.

The result is a :class:`PrototypeBank` with ``features`` P of shape (N, K, d).

Fallbacks (documented, never a crash inside K-means): a class with no eligible image raises
:class:`~pbip_core.errors.DataError` naming the class; a class with ``0 < n < K`` eligible images gets one cluster per
image and its prototypes are repeated cyclically up to K (a warning says so); a cluster smaller than ``N_K`` keeps all
its images.

``bank.selection`` switches the construction for the ablations: ``cluster`` (the paper), ``random`` (Fig. 4: K random
sub-banks of N_K images, no clustering) and ``centroid`` (the official code: prototypes are the K-means centres over all
bank images, no white filter, no top-N_K selection).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, PBIPError

WHITE_LEVEL = 220  # a pixel is "white" when min(R, G, B) > WHITE_LEVEL


# ---------------------------------------------------------------------- selection
def select_single_class(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of single-class images per class.

    labels: (M, N) 0/1 image-level labels. Returns N arrays of row indices whose label vector is one-hot at that class.
    """
    labels = np.asarray(labels)
    single = labels.sum(axis=1) == 1
    return [np.flatnonzero(single & (labels[:, n] == 1)) for n in range(labels.shape[1])]


def white_fraction(image: np.ndarray, level: int = WHITE_LEVEL) -> float:
    """Share of white pixels in an (H, W, 3) uint8 RGB image: all three channels above ``level``."""
    return float((image.min(axis=2) > level).mean())


# ---------------------------------------------------------------------- spherical K-means (eq. 1)
def cosine_distance(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Eq. 1 for all pairs: ``1 - cos``. x1 (A, d), x2 (B, d) -> (A, B)."""
    return 1 - F.normalize(x1, dim=-1) @ F.normalize(x2, dim=-1).T


def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int = 100, restarts: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means under the cosine distance of eq. 1 (centres live on the unit sphere).

    x: (M, d) features (any norm; they are L2-normalised). Returns ``centres`` (k, d) unit vectors and ``assign`` (M,)
    cluster indices. k-means++ seeding with cosine distance; the restart with the highest total cosine similarity wins.
    Runs on whatever device ``x`` lives on (a GPU path for free). Deterministic for a given ``seed``.
    """
    m = x.shape[0]
    if k < 1 or m < k:
        raise ValueError(f"spherical_kmeans needs 1 <= k <= number of points (k={k}, points={m})")
    xn = F.normalize(x.float(), dim=-1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(max(1, restarts)):
        centres = _kmeanspp(xn, k, gen)
        assign = torch.full((m,), -1, dtype=torch.long, device=x.device)
        for _ in range(iters):
            sim = xn @ centres.T                               # (M, k) cosine similarities
            new_assign = sim.argmax(dim=1)
            if torch.equal(new_assign, assign):
                break
            assign = new_assign
            sums = torch.zeros_like(centres).index_add_(0, assign, xn)
            counts = torch.bincount(assign, minlength=k)
            empty = counts == 0
            if empty.any():                                    # re-seed empty clusters at the worst-fit points
                worst = sim.max(dim=1).values.argsort()[: int(empty.sum())]
                sums[empty] = xn[worst]
            centres = F.normalize(sums, dim=-1)
        score = float((xn @ centres.T).max(dim=1).values.sum())
        if best is None or score > best[0]:
            best = (score, centres, (xn @ centres.T).argmax(dim=1))
    assert best is not None
    return best[1], best[2]


def _kmeanspp(xn: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    m = xn.shape[0]
    first = int(torch.randint(m, (1,), generator=gen))
    centres = [xn[first]]
    d = (1 - xn @ centres[0]).clamp_min(0)
    for _ in range(1, k):
        p = d.double().cpu() + 1e-12
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=gen))
        centres.append(xn[nxt])
        d = torch.minimum(d, (1 - xn @ xn[nxt]).clamp_min(0))
    return torch.stack(centres)


def nearest_to_centre(x: torch.Tensor, centre: torch.Tensor, members: torch.Tensor, nk: int) -> torch.Tensor:
    """The ``nk`` member indices with the smallest eq.-1 distance to ``centre`` (all of them if fewer)."""
    d = cosine_distance(x[members], centre[None])[:, 0]       # (|members|,)
    order = torch.argsort(d, stable=True)
    return members[order[:nk]]


# ---------------------------------------------------------------------- the bank
@dataclass
class PrototypeBank:
    """Prototype features P (N, K, d) and where they came from.

    ``members[n][k]`` lists the image names of class n's k-th sub-bank (empty for banks read from the official pickle).
    """

    features: torch.Tensor
    classes: list[str]
    encoder: str = "unknown"
    members: list[list[list[str]]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(self.features.shape[0])

    @property
    def k(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    def save(self, path: str | Path) -> None:
        from .io import atomic_torch_save

        atomic_torch_save(
            {"format": "pbip-bank-v1", "features": self.features.cpu(), "classes": list(self.classes),
             "encoder": self.encoder, "members": self.members, "info": self.info},
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> "PrototypeBank":
        """Read a bank saved by :meth:`save`, or the official repository's prototype pickle.

        The official file is a plain pickle of ``{"features": (sum K, d) unit rows, "k_list", "class_order",
        "cumsum_k"}``; it is read with a restricted unpickler and reshaped to (N, K, d) (equal K per class required).
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: prototype bank not found (build one with `pbip bank --data DIR --out {path}`)")
        try:
            with warnings.catch_warnings():           # the official pickle uses protocol 4: torch warns, reads it fine
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = _load_official_pickle(path)
        if not isinstance(obj, dict) or "features" not in obj:
            raise DataError(f"{path}: not a prototype bank (expected a dict with 'features')")
        if obj.get("format") == "pbip-bank-v1":
            return cls(obj["features"].float(), list(obj["classes"]), obj.get("encoder", "unknown"),
                       obj.get("members", []), obj.get("info", {}))
        return _from_official(obj, path)


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
    except Exception as e:
        raise DataError(f"{path}: cannot read prototype file ({type(e).__name__}: {e})") from None


def _from_official(obj: dict, path: Path) -> PrototypeBank:
    feats = torch.as_tensor(obj["features"]).float()
    k_list = [int(k) for k in obj.get("k_list", [])]
    classes = [str(c) for c in obj.get("class_order", [])]
    if not k_list or len(set(k_list)) != 1 or sum(k_list) != feats.shape[0]:
        raise DataError(f"{path}: k_list {k_list} does not split {feats.shape[0]} prototype rows into equal K per class")
    n, k = len(k_list), k_list[0]
    if len(classes) != n:
        classes = [f"class{i}" for i in range(n)]
    return PrototypeBank(feats.reshape(n, k, -1), classes, encoder="official-pickle",
                         info={"source": str(path), "note": "official PBIP repository prototypes (K-means centres)"})


# ---------------------------------------------------------------------- building
def build_prototypes(
    feats: torch.Tensor,
    class_members: Sequence[np.ndarray],
    names: Sequence[str],
    k: int,
    nk: int,
    selection: str = "cluster",
    seed: int = 0,
    iters: int = 100,
    restarts: int = 5,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, list[list[list[str]]]]:
    """Prototypes P (N, K, d) from encoded bank images.

    feats: (M, d) features of all candidate images; class_members[n]: indices (into feats) of class n's eligible images.
    """
    protos, members = [], []
    for n, idx in enumerate(class_members):
        cname = class_names[n] if class_names else str(n)
        if len(idx) == 0:
            raise DataError(
                f"class {cname!r}: no eligible single-class training image for the image bank (sec. 3.2); "
                "lower bank.white_threshold or add single-class images"
            )
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        x = feats[idx_t]
        kk = min(k, len(idx))
        if kk < k:
            warnings.warn(f"class {cname!r} has {len(idx)} eligible images < K={k}: using {kk} clusters, "
                          "prototypes repeated cyclically up to K", stacklevel=2)
        if selection == "random":
            gen = torch.Generator().manual_seed(seed * 1000 + n)
            perm = torch.randperm(len(idx), generator=gen)
            groups = [perm[j::kk][:nk] for j in range(kk)]
            cls_protos = [x[g].mean(0) for g in groups]
            cls_members = [[names[int(idx[int(i)])] for i in g] for g in groups]
        else:
            centres, assign = spherical_kmeans(x, kk, iters=iters, restarts=restarts, seed=seed + n)
            cls_protos, cls_members = [], []
            for j in range(kk):
                mem = torch.nonzero(assign == j).flatten()
                if selection == "centroid":              # official: the centre itself, all images
                    cls_protos.append(centres[j])
                    chosen = mem
                else:                                    # paper: top-N_K nearest the centre, mean feature
                    chosen = nearest_to_centre(x, centres[j], mem, nk)
                    cls_protos.append(x[chosen].mean(0))
                cls_members.append([names[int(idx[int(i)])] for i in chosen])
        while len(cls_protos) < k:                       # documented fallback for tiny classes
            cls_protos.append(cls_protos[len(cls_protos) % kk])
            cls_members.append(cls_members[len(cls_members) % kk])
        protos.append(torch.stack(cls_protos))
        members.append(cls_members)
    return torch.stack(protos), members


def build_bank(
    data_root: str | Path,
    cfg: Any,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    encoder: Any = None,
    progress: bool = True,
) -> PrototypeBank:
    """Build the image bank of a dataset folder (sec. 3.2). ``cfg`` is a :class:`~pbip_core.config.BankConfig`."""
    from .data import list_train, load_info
    from .encoders import get_encoder

    info = load_info(data_root)
    items = list_train(data_root, info)
    names = [p.name for p, _ in items]
    labels = np.stack([lab for _, lab in items])
    class_members = select_single_class(labels)
    candidates = np.unique(np.concatenate(class_members)) if class_members else np.array([], dtype=int)

    if encoder is None:
        encoder = get_encoder(cfg.encoder, device=device, input_size=cfg.encoder_size or None)
    paths = [items[i][0] for i in candidates]
    feats_c, whites = encode_images(paths, encoder, cfg.batch_size, cache_dir, device, progress)
    pos = {int(i): j for j, i in enumerate(candidates)}
    keep_white = cfg.selection == "centroid"             # the official code has no white filter
    eligible = [np.array([pos[int(i)] for i in idx if keep_white or whites[pos[int(i)]] <= cfg.white_threshold],
                         dtype=int) for idx in class_members]
    cand_names = [names[int(i)] for i in candidates]
    protos, members = build_prototypes(
        feats_c, eligible, cand_names, cfg.k, cfg.nk, cfg.selection, cfg.seed, cfg.kmeans_iters,
        cfg.kmeans_restarts, info.classes,
    )
    stats = {
        "single_class": [int(len(m)) for m in class_members],
        "eligible": [int(len(e)) for e in eligible],
        "dropped_white": [int(len(m) - len(e)) for m, e in zip(class_members, eligible)],
    }
    return PrototypeBank(
        protos, list(info.classes), encoder=cfg.encoder, members=members,
        info={"data_root": str(data_root), "k": cfg.k, "nk": cfg.nk, "selection": cfg.selection,
              "white_threshold": cfg.white_threshold, "seed": cfg.seed, "stats": stats,
              "encoder_source": getattr(encoder, "pretrained_source", "")},
    )


def encode_images(
    paths: Sequence[Path],
    encoder: Any,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, np.ndarray]:
    """Encode image files with ``encoder`` -> features (M, d) and white fractions (M,), cached by encoder + data hash."""
    from tqdm.auto import tqdm

    from .io import atomic_torch_save, read_rgb

    key = _data_hash(paths, f"{getattr(encoder, 'name', type(encoder).__name__)}@{getattr(encoder, 'input_size', '')}")
    cache = Path(cache_dir) / f"bank-features-{key}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        obj = torch.load(cache, map_location="cpu", weights_only=True)
        return obj["features"], obj["white"].numpy()
    feats, whites = [], []
    it = range(0, len(paths), batch_size)
    for s in tqdm(it, desc="encode bank images", disable=not progress, unit="batch"):
        arrs = [read_rgb(p) for p in paths[s:s + batch_size]]
        whites.extend(white_fraction(a) for a in arrs)
        x = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrs]).float().div(255).to(device)
        with torch.no_grad():
            feats.append(encoder.encode(x).float().cpu())
    d = getattr(encoder, "dim", 0)
    out = torch.cat(feats) if feats else torch.zeros(0, d)
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


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--encoder", default=None, help="encoder name (default: the profile's bank.encoder)")
    p.add_argument("--k", type=int, default=None, help="clusters per class K (default: profile)")
    p.add_argument("--nk", type=int, default=None, help="images per cluster N_K (default: profile)")
    p.add_argument("--profile", default="demo", help="smoke | demo | paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache", default="cache", help="feature cache folder (default: ./cache)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output .pt file")


def main(args: argparse.Namespace) -> int:
    from .config import make_config

    ov = list(args.overrides)
    for key, val in (("bank.encoder", args.encoder), ("bank.k", args.k), ("bank.nk", args.nk)):
        if val is not None:
            ov.append(f"{key}={val}")
    cfg = make_config(args.profile, ov)
    if not Path(args.data).is_dir():
        raise DataError(f"{args.data}: dataset folder not found")
    device = resolve_device(args.device)
    bank = build_bank(args.data, cfg.bank, cache_dir=args.cache, device=device)
    bank.save(args.out)
    st = bank.info["stats"]
    print(f"bank: {bank.n_classes} classes x K={bank.k} prototypes of d={bank.dim} ({bank.encoder}) -> {args.out}")
    for n, c in enumerate(bank.classes):
        sizes = [len(m) for m in bank.members[n]]
        print(f"  {c:>6}: {st['single_class'][n]} single-class, {st['dropped_white'][n]} dropped as white, "
              f"sub-bank sizes {sizes}")
    return 0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PBIPError(f"device {device!r} requested but CUDA is not available")
    return device
