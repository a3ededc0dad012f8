"""Datasets (paper sec. 4.1): folder readers, augmentation, the dataset checker, the manifest and the built-in sets.

The folder format is described in :mod:`pbip_core.data.folder` and ``docs/DESIGN.md`` ("Dataset folder format").
"""

from .augment import dihedral, item_generator, random_dihedral
from .folder import (
    IMAGE_SUFFIXES,
    KNOWN_DATASETS,
    MASK_SUFFIXES,
    SPLITS,
    DatasetInfo,
    PseudoMaskDataset,
    SegDataset,
    TrainDataset,
    bad_mask_values,
    collate_seg,
    image_files,
    known_name,
    list_pairs,
    list_train,
    load_info,
    parse_label,
    prediction_name,
    resize_image,
    subset_indices,
    to_tensor,
    validate_mask,
)
from .manifest import load_manifest

__all__ = [
    "IMAGE_SUFFIXES", "KNOWN_DATASETS", "MASK_SUFFIXES", "SPLITS", "DatasetInfo", "PseudoMaskDataset", "SegDataset",
    "TrainDataset", "bad_mask_values",
    "collate_seg", "dihedral", "image_files", "item_generator", "known_name", "list_pairs", "list_train", "load_info",
    "load_manifest", "parse_label", "prediction_name", "random_dihedral", "resize_image", "subset_indices", "to_tensor",
    "validate_mask",
]
