"""Data: the synthetic data set, folder loaders (ISIC 2018, PH2, images/ + masks/), augmentations, splits."""

from .augment import PublishedAugmentation
from .folders import (DataError, LAYOUTS, Sample, SegmentationDataset, build_cache, detect_layout, discover,
                      find_image_mask_pairs, find_isic2018, find_ph2, list_images, read_image, read_mask)
from .splits import load_split, published_split, random_split, save_split, train_test_split_indices
from .synthetic import SyntheticLesionDataset, render_lesion, write_synthetic_dataset

__all__ = [
    "PublishedAugmentation", "DataError", "LAYOUTS", "Sample", "SegmentationDataset", "build_cache",
    "detect_layout", "discover", "find_image_mask_pairs", "find_isic2018", "find_ph2", "list_images",
    "read_image", "read_mask", "load_split", "published_split", "random_split", "save_split",
    "train_test_split_indices", "SyntheticLesionDataset", "render_lesion", "write_synthetic_dataset",
]
