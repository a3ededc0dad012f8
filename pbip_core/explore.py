"""What the book's chapters compute on top of the library: the image bank's intermediate steps, a trained stage-1
run shared between chapters, and the per-level maps of a batch.

Chapters 02-04 (and 05-09 may) call these so that their cells only hold narrative, parameters and plots.

* :func:`stage1_run`: one trained stage-1 run of the chapter's profile, from the experiment runner's cache
  (:func:`pbip_core.experiments.run_grid`; trained once, reused by every chapter that asks for the same run).
* :class:`Pool` / :func:`single_class_pool`: sec. 3.2 steps 1-3 kept apart (single-class selection, white filter,
  encoder features), so a chapter can show each of them.
* :func:`cluster_pool`: step 4-5 (spherical K-means per class, top-N_K per cluster, prototypes), returning the
  assignment of every image as well (for plots). Same seeds and calls as :func:`pbip_core.bank.build_prototypes`,
  so its prototypes are the bank's.
* :func:`class_maps`: eq. 2-3 on a batch and the [0, 1] map M that eq. 4-5 threshold (as ImgMatchNet does).
* :func:`sim_pixel_check`: eq. 2 written out for one pixel, beside :func:`pbip_core.model.sim_map`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import DataError


# ---------------------------------------------------------------------------------------------------- trained run
#: Per profile, what the book's shared stage-1 run trims so that `make book` fits its CPU time budget. The same trims,
#: splits and stage flags as the baseline of the book's ablation grid (``grids/book/book-ablation.yaml``, chapters 07
#: and 09): the run has the same content hash and is trained once for all these chapters.
BOOK_RUN_OVERRIDES: dict[str, dict[str, Any]] = {"smoke": {}, "demo": {"data.max_train": 120, "train.epochs": 2},
                                                 "paper": {}}


def stage1_grid(ch: Any, method: str = "pbip", seed: int | None = None, splits: Sequence[str] = ("test",),
                stage2: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one-run grid (dict for :func:`~pbip_core.experiments.run_grid`) of a chapter's profile and dataset,
    with :data:`BOOK_RUN_OVERRIDES` of the profile applied (then ``overrides``).

    ``ch`` is a :class:`pbip_core.book.Chapter`. The run's hash depends on the config, the dataset path, ``splits``
    and ``stage2``: chapters asking with the same arguments share one run.
    """
    over = {**BOOK_RUN_OVERRIDES.get(ch.profile, {}), "bank.encoder": ch.encoder, **(overrides or {})}
    return {"name": f"book-{ch.profile}", "profile": ch.profile, "datasets": [str(ch.dataset)],
            "methods": [method], "seeds": [int(ch.seeds[0] if seed is None else seed)], "stage2": bool(stage2),
            "splits": list(splits), "overrides": over}


def stage1_run(ch: Any, method: str = "pbip", seed: int | None = None, splits: Sequence[str] = ("test",),
               stage2: bool = False, overrides: dict[str, Any] | None = None) -> Path:
    """The stage-1 run folder (``.../runs/<hash>/stage1``) of the chapter's profile, trained now if not cached.

    Results live in ``<out_dir>/experiments`` (table ``book-<profile>.csv``, run folders ``runs/<hash>``).
    Raises :class:`DataError` with the runner's reason when the run failed.
    """
    from .experiments import run_grid

    results = Path(ch.out_dir) / "experiments"
    df = run_grid(stage1_grid(ch, method, seed, splits, stage2, overrides), results_dir=results)
    row = df.iloc[0]
    if row["status"] != "ok":
        raise DataError(f"{results / 'runs' / str(row['hash'])}: the stage-1 run failed: {row.get('error', '')}")
    return results / "runs" / str(row["hash"]) / "stage1"


# ---------------------------------------------------------------------------------------------------- the bank pool
@dataclass
class Pool:
    """Single-class training images of a dataset, encoded (sec. 3.2 steps 1-3).

    ``paths`` (M,), ``label`` (M,) class index, ``features`` (M, d), ``white`` (M,) white-pixel share,
    ``eligible`` (M,) bool: kept by the white filter (``white <= white_threshold``).
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
    """Steps 1-3 of the bank (sec. 3.2) with :mod:`pbip_core.bank`'s functions: select, encode, white-filter.

    ``bank_cfg`` is a :class:`~pbip_core.config.BankConfig` (encoder, encoder_size, white_threshold). Features are
    cached in ``cache_dir`` (the same cache :func:`pbip_core.bank.build_bank` uses).
    """
    from .bank import encode_images, select_single_class
    from .data import list_train, load_info
    from .encoders import get_encoder

    info = load_info(data_root)
    items = list_train(data_root, info)
    if not items:
        raise DataError(f"{data_root}/train: no training images")
    labels = np.stack([lab for _, lab in items])
    per_class = select_single_class(labels)
    idx = np.concatenate(per_class)
    label = np.concatenate([np.full(len(m), n) for n, m in enumerate(per_class)]).astype(int)
    order = np.argsort(idx, kind="stable")                     # file order, as build_bank encodes them
    idx, label = idx[order], label[order]
    if encoder is None:
        encoder = get_encoder(bank_cfg.encoder, device=device, input_size=bank_cfg.encoder_size or None)
    paths = [items[i][0] for i in idx]
    feats, white = encode_images(paths, encoder, bank_cfg.batch_size, cache_dir, device, progress)
    return Pool(paths, label, feats, white, white <= bank_cfg.white_threshold, tuple(info.classes),
                float(bank_cfg.white_threshold), len(items), labels.sum(axis=0).astype(int),
                getattr(encoder, "name", bank_cfg.encoder), getattr(encoder, "pretrained_source", ""))


@dataclass
class Clusters:
    """Spherical K-means of each class's eligible images (eq. 1) and the top-N_K sub-banks.

    Per class n: ``index[n]`` pool indices of its eligible images, ``assign[n]`` their cluster (len = |index[n]|),
    ``centres[n]`` (K, d) unit vectors, ``chosen[n][k]`` the pool indices of sub-bank k (nearest N_K to the centre,
    nearest first). ``prototypes`` P (N, K, d): the mean feature of each sub-bank.
    """

    k: int
    nk: int
    index: list[np.ndarray] = field(default_factory=list)
    assign: list[np.ndarray] = field(default_factory=list)
    centres: list[torch.Tensor] = field(default_factory=list)
    chosen: list[list[np.ndarray]] = field(default_factory=list)
    prototypes: torch.Tensor | None = None


def cluster_pool(pool: Pool, k: int, nk: int, seed: int = 0, iters: int = 100, restarts: int = 5) -> Clusters:
    """Steps 4-5 of the bank on a :class:`Pool` (the paper's ``cluster`` selection).

    Calls :func:`~pbip_core.bank.spherical_kmeans` with seed ``seed + n`` for class n and
    :func:`~pbip_core.bank.nearest_to_centre`, as :func:`~pbip_core.bank.build_prototypes` does; a class with
    fewer than K images gets one cluster per image and cyclically repeated prototypes (the bank's fallback).
    """
    from .bank import nearest_to_centre, spherical_kmeans

    out = Clusters(k=k, nk=nk)
    protos = []
    for n, name in enumerate(pool.classes):
        idx = pool.members(n)
        if len(idx) == 0:
            raise DataError(f"class {name!r}: no eligible single-class training image for the image bank")
        x = pool.features[torch.as_tensor(idx, dtype=torch.long)]
        kk = min(k, len(idx))
        centres, assign = spherical_kmeans(x, kk, iters=iters, restarts=restarts, seed=seed + n)
        chosen = [nearest_to_centre(x, centres[j], torch.nonzero(assign == j).flatten(), nk).numpy()
                  for j in range(kk)]
        cls_protos = [x[torch.as_tensor(c)].mean(0) for c in chosen]
        cls_protos += [cls_protos[j % kk] for j in range(kk, k)]
        out.index.append(idx)
        out.assign.append(assign.numpy())
        out.centres.append(centres)
        out.chosen.append([idx[c] for c in chosen])
        protos.append(torch.stack(cls_protos))
    out.prototypes = torch.stack(protos)
    return out


def cosine_matrix(protos: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every prototype with every other: P (N, K, d) -> (N*K, N*K), rows class-major."""
    p = F.normalize(protos.reshape(-1, protos.shape[-1]).float(), dim=-1)
    return (p @ p.T).numpy()


def similarity_summary(protos: torch.Tensor, classes: Sequence[str]) -> pd.DataFrame:
    """Mean cosine between prototypes of the same class (off-diagonal) and of different classes, per class."""
    n, k, _ = protos.shape
    s = cosine_matrix(protos).reshape(n, k, n, k)
    rows = {}
    for i, c in enumerate(classes):
        within = s[i, :, i, :][~np.eye(k, dtype=bool)] if k > 1 else np.array([np.nan])
        between = np.concatenate([s[i, :, j, :].ravel() for j in range(n) if j != i])
        rows[c] = {"within class (other prototypes)": float(np.mean(within)),
                   "to other classes": float(np.mean(between)), "max to another class": float(np.max(between))}
    return pd.DataFrame(rows).T.rename_axis("class")


def official_prototype_path() -> Path:
    """``shared/fixtures/official_bcss_prototypes.pkl`` beside the book root or beside the installed repository
    (the first that exists; the book root's when neither does)."""
    from .book import repo_root

    rel = Path("shared") / "fixtures" / "official_bcss_prototypes.pkl"
    candidates = [repo_root().parent / rel, Path(__file__).resolve().parents[2] / rel]
    return next((c for c in candidates if c.is_file()), candidates[0])


def project_2d(pool: Pool, clusters: Clusters, method: str = "pca", seed: int = 0) -> dict[str, np.ndarray]:
    """2-D coordinates of the eligible images and of the prototypes, on the unit-normalised features.

    ``method``: ``"pca"`` (sklearn PCA fitted on the images; prototypes projected with it) or ``"tsne"`` (images and
    prototypes embedded together, cosine metric). Returns ``xy`` (M', 2), ``cls`` (M',), ``cluster`` (M',),
    ``proto_xy`` (N*K, 2), ``proto_cls`` and ``proto_k`` (N*K,).
    """
    idx = np.concatenate(clusters.index)
    cls = np.concatenate([np.full(len(i), n) for n, i in enumerate(clusters.index)])
    cluster = np.concatenate(clusters.assign)
    x = F.normalize(pool.features[torch.as_tensor(idx)].float(), dim=-1).numpy()
    p = F.normalize(clusters.prototypes.reshape(-1, clusters.prototypes.shape[-1]).float(), dim=-1).numpy()
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(x)
        xy, pxy = pca.transform(x), pca.transform(p)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        both = TSNE(n_components=2, metric="cosine", init="pca", random_state=seed,
                    perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))).fit_transform(np.concatenate([x, p]))
        xy, pxy = both[: len(x)], both[len(x):]
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    n, k = clusters.prototypes.shape[:2]
    return {"xy": xy, "cls": cls, "cluster": cluster, "proto_xy": pxy,
            "proto_cls": np.repeat(np.arange(n), k), "proto_k": np.tile(np.arange(k), n)}


# ------------------------------------------------------------------------------------------ eq. 2-5 on a batch
def val_batch(data_root: str | Path, split: str, image_size: int, n: int, start: int = 0
              ) -> tuple[torch.Tensor, list[np.ndarray], list[str]]:
    """``n`` images of a split from index ``start``, resized to ``image_size``.

    Returns x (B, 3, S, S) in [0, 1], the GT masks (S, S) resized with nearest neighbours (so they line up with
    the maps), and the file names.
    """
    from .data import SegDataset

    ds = SegDataset(data_root, split, image_size=image_size)
    if len(ds) == 0:
        raise DataError(f"{data_root}/{split}: no images")
    items = [ds[i] for i in range(min(start, len(ds) - 1), min(start + n, len(ds)))]
    x = torch.stack([it["image"] for it in items])
    masks = [F.interpolate(it["mask"][None, None].float(), size=tuple(x.shape[-2:]), mode="nearest")[0, 0]
             .to(torch.uint8).numpy() for it in items]
    return x, masks, [it["name"] for it in items]


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """Images (B, 3, H, W) in [0, 1] -> list of (H, W, 3) uint8 arrays (for plotting)."""
    return list((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def present_classes(masks: Sequence[np.ndarray], n_classes: int) -> torch.Tensor:
    """Classes in each GT mask (background ignored): (B, N) bool."""
    from .pseudo import gt_present

    return torch.stack([gt_present(m, n_classes) for m in masks])


def largest_class(mask: np.ndarray, n_classes: int) -> int:
    """The tissue class with the most pixels in a GT mask (background ignored)."""
    return int(np.bincount(np.asarray(mask).ravel().astype(np.int64), minlength=n_classes + 1)[:n_classes].argmax())


@torch.no_grad()
def class_maps(classnet: Any, x: torch.Tensor) -> dict[str, Any]:
    """Eq. 2-3 for a batch, and M for eq. 4-5.

    x (B, 3, H, W) -> ``maps`` [M_i (B, N, h_i, w_i)] (eq. 2), ``fused`` M' (B, N, H, W) (eq. 3, sum of the
    bilinearly upsampled levels), ``m`` = M' min-max rescaled per image and class to [0, 1] (what ImgMatchNet
    thresholds), ``logits`` (B, N) (level mean of the image logits).
    """
    from .model import aggregate, minmax

    classnet.eval()
    out = classnet(x)
    fused = aggregate(out.maps, tuple(x.shape[-2:]))
    return {"maps": out.maps, "fused": fused, "m": minmax(fused), "logits": out.logits.mean(dim=0)}


@torch.no_grad()
def sim_pixel_check(classnet: Any, x: torch.Tensor, level: int = 0, b: int = 0, n: int = 0,
                    yx: tuple[int, int] = (0, 0)) -> dict[str, float]:
    """Eq. 2 written out for one pixel ``yx`` of image ``b``, class ``n``, level index ``level``.

    Returns ``explicit`` = 1/K sum_k (F(p) . P(n,k)) / (||F(p)|| ||P(n,k)||) computed with Python floats from the
    raw backbone features and the MLP-projected prototypes, ``sim_map`` = the library's value at the same place,
    and ``abs_diff``.
    """
    from .model import sim_map

    feats = classnet.backbone(x)
    f = feats[classnet.levels[level] - 1]                          # F_i (B, C_i, h_i, w_i)
    p = classnet.projected_prototypes()[level]                     # P_i (N, K, C_i)
    y, xx = yx
    fp = [float(v) for v in f[b, :, y, xx]]
    norm_f = sum(v * v for v in fp) ** 0.5
    total = 0.0
    for k in range(p.shape[1]):
        pk = [float(v) for v in p[n, k]]
        dot = sum(a * c for a, c in zip(fp, pk))
        total += dot / (norm_f * sum(v * v for v in pk) ** 0.5)
    explicit = total / p.shape[1]
    lib = float(sim_map(f, p, classnet.normalize_prototypes)[b, n, y, xx])
    return {"explicit": explicit, "sim_map": lib, "abs_diff": abs(explicit - lib)}


def foreground_share(m: torch.Tensor, present: torch.Tensor, deltas: Sequence[float], scope: str = "class"
                     ) -> pd.DataFrame:
    """Share of foreground pixels of b (eq. 4) over the (image, class) pairs present, for each delta.

    m (B, N, H, W) in [0, 1]; present (B, N) bool. Also the share of the soft FG weight b * M and of M itself
    ("no AT": FG = M). Returns one row per delta.
    """
    from .model import adaptive_threshold

    sel = present.bool()
    rows = []
    for d in deltas:
        b = adaptive_threshold(m, float(d), scope)
        rows.append({"delta": float(d), "foreground share (b)": float(b[sel].mean()),
                     "mean FG weight b·M": float((b * m)[sel].mean()),
                     "mean FG weight without AT (M)": float(m[sel].mean())})
    return pd.DataFrame(rows).set_index("delta")
