"""The image bank and its prototypes (sec. 3.2, eq. 1).

The bank is built from the training set alone, with image-level labels:

1. keep the training images whose label vector has exactly one class (``select_single_class``);
2. drop those that are mostly white glass (``white_fraction`` > ``bank.white_threshold``; a pixel is white when
   all of R, G, B exceed 220, i.e. bright and unsaturated);
3. encode every remaining image with the frozen encoder phi_e;
4. per class, spherical K-means with the cosine distance of eq. 1, ``D(x1, x2) = 1 - cos(phi(x1), phi(x2))``;
5. per cluster, keep the ``N_K`` images nearest the centre; the prototype is the mean feature of that sub-bank.

Steps 1, 2, 4 and 5 are the functions of this module (tensors and arrays in, tensors out); :func:`build_prototypes`
runs steps 4-5 and returns every intermediate result (:class:`BankSteps`) so a chapter can plot them. Reading the
training folder and encoding the images (step 3, with a feature cache) is :mod:`pbip_core.engine.bank`, which also
saves and loads :class:`PrototypeBank` files.

Fallbacks (documented, never a crash inside K-means): a class with no eligible image raises
:class:`~pbip_core.errors.DataError` naming the class; a class with ``0 < n < K`` eligible images gets one cluster per
image and its prototypes are repeated cyclically up to K (a warning says so); a cluster smaller than ``N_K`` keeps all
its images.

``bank.selection`` switches the construction for the ablations: ``cluster`` (the paper), ``random`` (Fig. 4: K random
sub-banks of N_K images, no clustering) and ``centroid`` (the official code: prototypes are the K-means centres over all
bank images, no white filter, no top-N_K selection).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

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


# ---------------------------------------------------------------------- steps 4-5: prototypes
@dataclass
class BankSteps:
    """Steps 4-5 of the bank for every class, with everything a figure needs.

    Indices point into the feature matrix given to :func:`build_prototypes`. Per class n: ``index[n]`` its eligible
    images, ``assign[n]`` the cluster of each of them (len = |index[n]|), ``centres[n]`` (K_n, d) unit vectors,
    ``chosen[n][k]`` sub-bank k (nearest N_K to the centre first; every member for ``centroid``; the random group for
    ``random``). ``prototypes`` P (N, K, d).
    """

    k: int
    nk: int
    selection: str
    index: list[np.ndarray] = field(default_factory=list)
    assign: list[np.ndarray] = field(default_factory=list)
    centres: list[torch.Tensor] = field(default_factory=list)
    chosen: list[list[np.ndarray]] = field(default_factory=list)
    prototypes: torch.Tensor | None = None

    def members(self, names: Sequence[str]) -> list[list[list[str]]]:
        """``members[n][k]``: the names of sub-bank k of class n (``names`` indexed like the features)."""
        return [[[names[int(i)] for i in c] for c in per] for per in self.chosen]


def _random_groups(n_images: int, k: int, nk: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Figure 4's random sub-banks: k disjoint random groups of at most nk images (local indices)."""
    perm = torch.randperm(n_images, generator=gen)
    return [perm[j::k][:nk] for j in range(k)]


def build_prototypes(
    feats: torch.Tensor,
    class_members: Sequence[np.ndarray],
    k: int,
    nk: int,
    selection: str = "cluster",
    seed: int = 0,
    iters: int = 100,
    restarts: int = 5,
    class_names: Sequence[str] | None = None,
) -> BankSteps:
    """Steps 4-5: prototypes P (N, K, d) from encoded bank images, with the intermediate results.

    feats (M, d): features of all candidate images; class_members[n]: indices (into feats) of class n's eligible
    images. ``selection``: ``cluster`` (the paper: spherical K-means, top-N_K nearest each centre, mean feature),
    ``random`` (Fig. 4: K random sub-banks of N_K images) or ``centroid`` (the official code: the K-means centres over
    all images). K-means of class n uses seed ``seed + n``; a class with 0 < n_images < K gets one cluster per image
    and its prototypes are repeated cyclically up to K (with a warning); a class without images is a DataError.
    """
    steps = BankSteps(k=k, nk=nk, selection=selection)
    protos = []
    for n, idx in enumerate(class_members):
        cname = class_names[n] if class_names else str(n)
        idx = np.asarray(idx, dtype=int)
        if len(idx) == 0:
            raise DataError(
                f"class {cname!r}: no eligible single-class training image for the image bank (sec. 3.2); "
                "lower bank.white_threshold or add single-class images"
            )
        x = feats[torch.as_tensor(idx, dtype=torch.long)]                  # (M_n, d)
        kk = min(k, len(idx))
        if kk < k:
            warnings.warn(f"class {cname!r} has {len(idx)} eligible images < K={k}: using {kk} clusters, "
                          "prototypes repeated cyclically up to K", stacklevel=2)
        if selection == "random":
            groups = _random_groups(len(idx), kk, nk, torch.Generator().manual_seed(seed * 1000 + n))
            assign = torch.full((len(idx),), -1, dtype=torch.long)
            for j, g in enumerate(groups):
                assign[g] = j
            centres = torch.stack([F.normalize(x[g].mean(0), dim=-1) for g in groups])
            cls_protos = [x[g].mean(0) for g in groups]
        else:
            centres, assign = spherical_kmeans(x, kk, iters=iters, restarts=restarts, seed=seed + n)   # step 4
            groups, cls_protos = [], []
            for j in range(kk):
                mem = torch.nonzero(assign == j).flatten()
                if selection == "centroid":                  # official: the centre itself, all images
                    groups.append(mem)
                    cls_protos.append(centres[j])
                else:                                        # paper: top-N_K nearest the centre, mean feature (step 5)
                    chosen = nearest_to_centre(x, centres[j], mem, nk)
                    groups.append(chosen)
                    cls_protos.append(x[chosen].mean(0))
        cls_protos += [cls_protos[j % kk] for j in range(kk, k)]          # documented fallback for tiny classes
        groups = list(groups) + [groups[j % kk] for j in range(kk, k)]
        steps.index.append(idx)
        steps.assign.append(assign.numpy())
        steps.centres.append(centres)
        steps.chosen.append([idx[g.numpy()] for g in groups])
        protos.append(torch.stack(cls_protos))
    steps.prototypes = torch.stack(protos)
    return steps


# ---------------------------------------------------------------------- the bank
@dataclass
class PrototypeBank:
    """Prototype features P (N, K, d) and where they came from.

    ``members[n][k]`` lists the image names of class n's k-th sub-bank (empty for banks read from the official pickle).
    Saved and loaded by :func:`pbip_core.engine.bank.save_bank` / :func:`~pbip_core.engine.bank.load_bank`.
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
