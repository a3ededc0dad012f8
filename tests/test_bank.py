"""Sec. 3.2: single-class selection, white filter, spherical K-means (eq. 1), top-N_K, prototypes, the official file."""

import pickle

import numpy as np
import pytest
import torch

from pbip_core.engine.bank import OFFICIAL_PROTOTYPES, load_bank, save_bank
from pbip_core.errors import DataError
from pbip_core.method.bank import (PrototypeBank, build_prototypes, cosine_distance, nearest_to_centre,
                                   select_single_class, spherical_kmeans, white_fraction)


def test_select_single_class():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]])
    sel = select_single_class(labels)
    assert [s.tolist() for s in sel] == [[0], [], [2, 3]]


def test_white_fraction():
    img = np.full((4, 4, 3), 255, np.uint8)
    img[:2] = (200, 120, 180)          # tissue rows
    img[3, 0] = (230, 230, 100)        # bright but saturated (blue channel low) -> not white
    assert white_fraction(img) == pytest.approx(7 / 16)


def test_eq1_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 3.0]])
    d = cosine_distance(a, b)
    assert d.shape == (2, 1)
    assert d[0, 0].item() == pytest.approx(1 - 1 / np.sqrt(2), abs=1e-6)


def _three_directions(n_per=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.eye(3)
    x = torch.cat([d + 0.05 * torch.randn(n_per, 3, generator=g) for d in dirs])
    # scale each point randomly: spherical K-means must ignore the norm
    x = x * (0.5 + 3 * torch.rand(len(x), 1, generator=g))
    return x, torch.arange(3).repeat_interleave(n_per)


def test_spherical_kmeans_recovers_directions_and_ignores_norms():
    x, truth = _three_directions()
    centres, assign = spherical_kmeans(x, 3, seed=1)
    assert torch.allclose(centres.norm(dim=1), torch.ones(3), atol=1e-5)
    # each true group maps to one cluster, and the clusters are distinct
    mapping = {int(t): set(assign[truth == t].tolist()) for t in range(3)}
    assert all(len(v) == 1 for v in mapping.values())
    assert len({next(iter(v)) for v in mapping.values()}) == 3
    # deterministic for a seed
    c2, a2 = spherical_kmeans(x, 3, seed=1)
    assert torch.equal(assign, a2) and torch.allclose(centres, c2)


def test_nearest_to_centre_picks_smallest_eq1_distance():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 1.0], [0.0, 1.0]])
    chosen = nearest_to_centre(x, torch.tensor([1.0, 0.0]), torch.arange(4), nk=2)
    assert chosen.tolist() == [0, 1]


def test_build_prototypes_cluster_mean_of_top_nk():
    x, truth = _three_directions(n_per=10)
    names = [f"img{i}.png" for i in range(len(x))]
    members = [np.arange(30), np.arange(10)]         # class 0: all three groups, class 1: group 0 only
    steps = build_prototypes(x, members, k=3, nk=4, seed=0)
    protos, mem = steps.prototypes, steps.members(names)
    assert protos.shape == (2, 3, 3)
    assert all(len(m) == 4 for m in mem[0])
    # each class-0 prototype is the mean feature of its 4 chosen images
    for k in range(3):
        idx = [names.index(n) for n in mem[0][k]]
        assert torch.allclose(protos[0, k], x[idx].mean(0), atol=1e-6)


def test_random_and_centroid_selection():
    x, _ = _three_directions(n_per=10)
    names = [f"i{i}" for i in range(len(x))]
    rand = build_prototypes(x, [np.arange(30)], k=3, nk=5, selection="random", seed=3)
    p_rand, m_rand = rand.prototypes, rand.members(names)
    assert p_rand.shape == (1, 3, 3) and all(len(m) == 5 for m in m_rand[0])
    cent = build_prototypes(x, [np.arange(30)], k=3, nk=5, selection="centroid", seed=3)
    p_cent, m_cent = cent.prototypes, cent.members(names)
    assert torch.allclose(p_cent.norm(dim=-1), torch.ones(1, 3), atol=1e-5)      # official: unit centres
    assert sum(len(m) for m in m_cent[0]) == 30                                    # all images, no top-N_K


def test_tiny_class_fallback_and_empty_class_error():
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match="< K=3"):
        protos = build_prototypes(x, [np.array([0, 1])], k=3, nk=2).prototypes
    assert protos.shape == (1, 3, 4) and torch.allclose(protos[0, 2], protos[0, 0])
    with pytest.raises(DataError, match="'NEC'.*no eligible single-class"):
        build_prototypes(x, [np.array([0, 1, 2]), np.array([], dtype=int)], k=2, nk=2, class_names=["TUM", "NEC"])


def test_steps_keep_every_intermediate():
    """The chapter plots the bank's own steps: assignments, centres and sub-banks of every class."""
    x, truth = _three_directions(n_per=10)
    steps = build_prototypes(x, [np.arange(30)], k=3, nk=4, seed=0)
    assert len(steps.assign[0]) == 30 and steps.centres[0].shape == (3, 3)
    assert np.array_equal(np.unique(steps.assign[0]), np.arange(3))
    for k, chosen in enumerate(steps.chosen[0]):
        assert len(chosen) == 4 and (steps.assign[0][chosen] == k).all()      # sub-bank k lies in cluster k


def test_save_load_roundtrip(tmp_path):
    bank = PrototypeBank(torch.randn(2, 3, 5), ["A", "B"], "enc", [[["a"], ["b"], ["c"]], [["d"], ["e"], ["f"]]])
    save_bank(bank, tmp_path / "b.pt")
    again = load_bank(tmp_path / "b.pt")
    assert torch.equal(again.features, bank.features) and again.classes == ["A", "B"] and again.members == bank.members


def test_official_prototype_file_reads_as_4x3x512():
    path = OFFICIAL_PROTOTYPES
    bank = load_bank(path)
    assert bank.features.shape == (4, 3, 512)
    assert bank.classes == ["TUM", "STR", "LYM", "NEC"]
    with open(path, "rb") as fh:
        raw = pickle.load(fh)["features"]
    assert torch.equal(bank.features[2, 1], raw[7])                    # LYM's 2nd prototype = row 6 + 1
    assert torch.allclose(bank.features.norm(dim=-1), torch.ones(4, 3), atol=1e-5)


def test_corrupt_bank_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.pt"
    p.write_bytes(b"not a bank")
    with pytest.raises(DataError, match="bad.pt"):
        load_bank(p)
    with pytest.raises(DataError, match="not found"):
        load_bank(tmp_path / "missing.pt")
