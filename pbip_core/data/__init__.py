"""Datasets (paper sec. 4.1): folder readers, the dataset checker, the manifest and the synthetic generator.

The folder format is described in :mod:`pbip_core.data.folder` and DESIGN.md ("Dataset folder format").
"""

from .folder import (
    KNOWN_DATASETS,
    SPLITS,
    DatasetInfo,
    SegDataset,
    TrainDataset,
    bad_mask_values,
    collate_seg,
    dihedral,
    known_name,
    list_pairs,
    list_train,
    load_info,
    parse_label,
    random_dihedral,
    resize_image,
    subset_indices,
    to_tensor,
    validate_mask,
)
from .manifest import load_manifest

__all__ = [
    "KNOWN_DATASETS", "SPLITS", "DatasetInfo", "SegDataset", "TrainDataset", "bad_mask_values", "collate_seg",
    "dihedral", "known_name", "list_pairs", "list_train", "load_info", "load_manifest", "parse_label",
    "random_dihedral", "resize_image", "subset_indices", "to_tensor", "validate_mask",
]
