"""Image/mask folder data sets: the ISIC 2018 Task 1 layout, the PH2 layout, and a plain images/ + masks/ pair.

Discovery functions return a sorted list of :class:`Sample` (id, image path, mask path). Every problem gets an
error that names the file: an image without its mask, a mask without its image, an unreadable or truncated
file, an image and mask of different sizes. :class:`SegmentationDataset` resizes samples to the model size
(bilinear for images, nearest for masks) and can keep the resized arrays in an on-disk cache of memory-mapped
``.npy`` files, so an epoch reads a few megabytes of arrays instead of decoding thousands of JPEGs.

    >>> samples = discover("/data/isic2018")                     # layout detected from the folder names
    >>> ds = SegmentationDataset(samples, img_size=(192, 256), cache_dir="~/.cache/dermomamba")
    >>> item = ds[0]; item["image"].shape, item["mask"].shape    # uint8 (3, 192, 256), uint8 (1, 192, 256)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DataError", "Sample", "IMAGE_EXTENSIONS", "LAYOUTS", "MASK_THRESHOLD",
    "find_isic2018", "find_ph2", "find_image_mask_pairs", "detect_layout", "discover", "list_images",
    "read_image", "read_mask", "resize_image", "resize_mask", "SegmentationDataset", "build_cache", "open_image",
    "is_image_name", "strip_mask_suffix",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LAYOUTS = ("isic2018", "ph2", "folder")
# Mask pixels above this grey level are lesion, the ISIC scorer's rule (masks are 0/255; PH2's read as RGB).
MASK_THRESHOLD = 128
# Name suffixes that mark a file as the mask of the image with the same stem (compared case-insensitively).
MASK_SUFFIXES = ("_segmentation", "_mask", "_lesion", "_gt", "")
CACHE_VERSION = 1


class DataError(ValueError):
    """A problem with the data on disk; the message names the offending file."""


@dataclass(frozen=True)
class Sample:
    """One image and its mask (``mask`` is None for prediction inputs)."""

    id: str
    image: str
    mask: Optional[str] = None


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive): ``is_image_name("a.JPG") -> True``."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _files(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))


def _find_child(parent: str, pattern: str) -> Optional[str]:
    regex = re.compile(pattern, re.IGNORECASE)
    matches = [name for name in sorted(os.listdir(parent)) if regex.fullmatch(name)
               and os.path.isdir(os.path.join(parent, name))]
    if len(matches) > 1:
        raise DataError(f"{parent} holds several folders matching {pattern}: {matches}")
    return os.path.join(parent, matches[0]) if matches else None


def _pair_up(images: dict[str, str], masks: dict[str, str], require_masks: bool) -> list[Sample]:
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"mask without its image: {masks[orphans[0]]} (no image with id {orphans[0]!r}"
                        + (f"; {len(orphans) - 1} more" if len(orphans) > 1 else "") + ")")
    samples = []
    for sample_id in sorted(images):
        mask = masks.get(sample_id)
        if mask is None and require_masks:
            raise DataError(f"missing mask for image {images[sample_id]} (id {sample_id!r})")
        samples.append(Sample(sample_id, images[sample_id], mask))
    if not samples:
        raise DataError("no images found")
    return samples


def _add_unique(table: dict[str, str], key: str, path: str) -> None:
    if key in table:
        raise DataError(f"two files have the id {key!r}: {table[key]} and {path}")
    table[key] = path


def find_isic2018(root: str | os.PathLike, subset: str = "Training", require_masks: bool = True) -> list[Sample]:
    """Samples of the ISIC 2018 Task 1 layout.

    ``root`` holds ``ISIC2018_Task1-2_<subset>_Input/ISIC_0000000.jpg`` and
    ``ISIC2018_Task1_<subset>_GroundTruth/ISIC_0000000_segmentation.png`` (subset "Training", "Validation" or
    "Test"). Files are matched on the 7-digit id; the ``_segmentation`` suffix is case-insensitive (2016/2017
    used ``_Segmentation``); non-image files (LICENSE.txt, ATTRIBUTION.txt) and images that are not lesion
    photographs (2017's ``_superpixels.png``) are skipped. ``root`` may also be the input folder itself.

        >>> find_isic2018("/data/isic2018")[0]
        Sample(id='ISIC_0000000', image='.../ISIC_0000000.jpg', mask='.../ISIC_0000000_segmentation.png')
    """
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DataError(f"ISIC 2018 folder not found: {root}")
    name = os.path.basename(os.path.normpath(root))
    own = re.fullmatch(r"ISIC2018_Task1-2_(\w+?)_Input", name, re.IGNORECASE)
    if own:
        image_dir, subset, parent = root, own.group(1), os.path.dirname(os.path.normpath(root))
    else:
        image_dir, parent = _find_child(root, rf"ISIC2018_Task1-2_{subset}_Input"), root
        if image_dir is None:
            raise DataError(f"{root} has no ISIC2018_Task1-2_{subset}_Input folder")
    mask_dir = _find_child(parent, rf"ISIC2018_Task1_{subset}_GroundTruth")
    if mask_dir is None and require_masks:
        raise DataError(f"{parent} has no ISIC2018_Task1_{subset}_GroundTruth folder (masks of {image_dir})")
    image_pattern = re.compile(r"(ISIC_\d{7})\.\w+", re.IGNORECASE)
    mask_pattern = re.compile(r"(ISIC_\d{7})_segmentation\.\w+", re.IGNORECASE)
    images, masks = {}, {}
    for file_name in _files(image_dir):
        match = image_pattern.fullmatch(file_name)
        if match and is_image_name(file_name):
            _add_unique(images, match.group(1).upper(), os.path.join(image_dir, file_name))
    if mask_dir is not None:
        for file_name in _files(mask_dir):
            match = mask_pattern.fullmatch(file_name)
            if match and is_image_name(file_name):
                _add_unique(masks, match.group(1).upper(), os.path.join(mask_dir, file_name))
    if not images:
        raise DataError(f"no ISIC_<7 digits> images in {image_dir}")
    return _pair_up(images, masks, require_masks)


def find_ph2(root: str | os.PathLike, require_masks: bool = True) -> list[Sample]:
    """Samples of the PH2 layout: ``PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp`` with
    ``IMD002_lesion/IMD002_lesion.bmp``. ``root`` is the folder holding ``PH2 Dataset images`` or that folder.

        >>> [s.id for s in find_ph2("/data/PH2Dataset")][:2]
        ['IMD002', 'IMD003']
    """
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DataError(f"PH2 folder not found: {root}")
    cases_dir = _find_child(root, r"PH2 Dataset images") or root
    images, masks = {}, {}
    for case in sorted(os.listdir(cases_dir)):
        case_dir = os.path.join(cases_dir, case)
        if not os.path.isdir(case_dir):
            continue
        image_dir = os.path.join(case_dir, f"{case}_Dermoscopic_Image")
        lesion_dir = os.path.join(case_dir, f"{case}_lesion")
        if os.path.isdir(image_dir):
            found = [n for n in _files(image_dir) if is_image_name(n) and Path(n).stem.lower() == case.lower()]
            if not found:
                raise DataError(f"no image {case}.bmp in {image_dir}")
            images[case] = os.path.join(image_dir, found[0])
        if os.path.isdir(lesion_dir):
            found = [n for n in _files(lesion_dir) if is_image_name(n) and Path(n).stem.lower() == f"{case}_lesion".lower()]
            if found:
                masks[case] = os.path.join(lesion_dir, found[0])
    if not images and not masks:
        raise DataError(f"no PH2 cases (IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp) under {cases_dir}")
    return _pair_up(images, masks, require_masks)


def strip_mask_suffix(stem: str) -> str:
    """The image id of a mask file stem: ``strip_mask_suffix("ISIC_0000000_Segmentation") -> "ISIC_0000000"``."""
    lowered = stem.lower()
    for suffix in MASK_SUFFIXES:
        if suffix and lowered.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def find_image_mask_pairs(image_dir: str | os.PathLike, mask_dir: str | os.PathLike | None = None,
                          require_masks: bool = True) -> list[Sample]:
    """Samples of a plain folder pair: ``images/<id>.<ext>`` and ``masks/<id>[_segmentation|_mask|_lesion|_gt].<ext>``.

    ``image_dir`` may be the parent of ``images/`` and ``masks/``. Suffixes are matched case-insensitively;
    non-image files are skipped.

        >>> find_image_mask_pairs("/data/mine")   # /data/mine/images/a.jpg + /data/mine/masks/a.png
        [Sample(id='a', image='/data/mine/images/a.jpg', mask='/data/mine/masks/a.png')]
    """
    image_dir = os.path.expanduser(os.fspath(image_dir))
    if mask_dir is None:
        parent = image_dir
        image_dir = _find_child(parent, "images?") or ""
        mask_dir = _find_child(parent, "masks?|ground_?truth|labels?")
        if not image_dir:
            raise DataError(f"{parent} has no images/ folder")
    mask_dir = os.path.expanduser(os.fspath(mask_dir)) if mask_dir is not None else None
    if not os.path.isdir(image_dir):
        raise DataError(f"image folder not found: {image_dir}")
    if mask_dir is None and require_masks:
        raise DataError(f"no masks/ folder next to {image_dir}")
    images, masks = {}, {}
    for name in _files(image_dir):
        if is_image_name(name):
            _add_unique(images, Path(name).stem, os.path.join(image_dir, name))
    if mask_dir is not None:
        if not os.path.isdir(mask_dir):
            raise DataError(f"mask folder not found: {mask_dir}")
        by_lower = {key.lower(): key for key in images}
        for name in _files(mask_dir):
            if is_image_name(name):
                stem = Path(name).stem
                # An exact stem match wins over suffix stripping (an image may itself be called "x_mask").
                key = by_lower.get(stem.lower()) or by_lower.get(strip_mask_suffix(stem).lower()) or strip_mask_suffix(stem)
                _add_unique(masks, key, os.path.join(mask_dir, name))
    return _pair_up(images, masks, require_masks)


def detect_layout(root: str | os.PathLike) -> str:
    """"isic2018", "ph2" or "folder", from the names of the folders under ``root``."""
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    names = [n.lower() for n in os.listdir(root)] + [os.path.basename(os.path.normpath(root)).lower()]
    if any(re.fullmatch(r"isic2018_task1-2_\w+_input", n) for n in names):
        return "isic2018"
    if "ph2 dataset images" in names or any(re.fullmatch(r"imd\d{3}", n) for n in names):
        return "ph2"
    if any(n in ("images", "image") for n in names):
        return "folder"
    raise DataError(f"cannot tell the layout of {root}: expected ISIC2018_Task1-2_<subset>_Input/, "
                    "'PH2 Dataset images/' or images/ + masks/ (pass the layout explicitly)")


def discover(root: str | os.PathLike, layout: str = "auto", subset: str = "Training",
             require_masks: bool = True) -> list[Sample]:
    """Samples under ``root`` in the given (or detected) layout; see the ``find_*`` functions."""
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "isic2018":
        return find_isic2018(root, subset, require_masks)
    if layout == "ph2":
        return find_ph2(root, require_masks)
    if layout == "folder":
        return find_image_mask_pairs(root, require_masks=require_masks)
    raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")


def list_images(paths: Sequence[str | os.PathLike]) -> list[Sample]:
    """Prediction inputs: image files, and the image files directly inside folders (others skipped).

    Ids are file stems; two inputs with the same stem are an error (their masks would overwrite each other).
    """
    found: dict[str, str] = {}
    for path in paths:
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            for name in _files(path):
                if is_image_name(name):
                    _add_unique(found, Path(name).stem, os.path.join(path, name))
        elif os.path.isfile(path):
            if not is_image_name(path):
                raise DataError(f"not an image file (extension not in {IMAGE_EXTENSIONS}): {path}")
            _add_unique(found, Path(path).stem, path)
        else:
            raise DataError(f"input not found: {path}")
    if not found:
        raise DataError(f"no images found in {[os.fspath(p) for p in paths]}")
    return [Sample(key, found[key]) for key in sorted(found)]


def open_image(path: str) -> Image.Image:
    """The decoded PIL image of ``path``; DataError naming the file if it is missing, corrupt or truncated."""
    try:
        image = Image.open(path)
        image.load()  # PIL decodes lazily: force it so a truncated file fails here, naming the file.
        return image
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise DataError(f"cannot read image file {path}: {error}") from error


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; DataError naming the file if it cannot be decoded."""
    return np.asarray(open_image(path).convert("RGB"))


def read_mask(path: str) -> np.ndarray:
    """(H, W) uint8 in {0, 1}: grey level > 128 is lesion (3-channel masks are converted to grey first)."""
    mask = open_image(path)
    if mask.mode in ("I", "I;16", "F"):
        array = np.asarray(mask, dtype=np.float64)
        array = array * (255.0 / max(array.max(), 1.0)) if array.max() > 255 else array
    else:
        array = np.asarray(mask.convert("L"))
    return (array > MASK_THRESHOLD).astype(np.uint8)


def resize_image(image: np.ndarray, img_size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image to ``img_size`` = (height, width)."""
    if image.shape[:2] == tuple(img_size):
        return image
    return np.asarray(Image.fromarray(image).resize((img_size[1], img_size[0]), Image.BILINEAR))


def resize_mask(mask: np.ndarray, img_size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) {0, 1} mask to ``img_size`` = (height, width)."""
    if mask.shape == tuple(img_size):
        return mask
    return np.asarray(Image.fromarray(mask).resize((img_size[1], img_size[0]), Image.NEAREST))


def load_sample(sample: Sample, img_size: Optional[tuple[int, int]]):
    """(image (H, W, 3) uint8, mask (H, W) uint8 or None, original (height, width)), resized if img_size."""
    image = read_image(sample.image)
    original = image.shape[:2]
    mask = None
    if sample.mask is not None:
        mask = read_mask(sample.mask)
        if mask.shape != original:
            raise DataError(f"size mismatch: image {sample.image} is {original[1]}x{original[0]} but its mask "
                            f"{sample.mask} is {mask.shape[1]}x{mask.shape[0]} (width x height)")
    if img_size is not None:
        image = resize_image(image, img_size)
        mask = resize_mask(mask, img_size) if mask is not None else None
    return image, mask, original


def _cache_key(samples: Sequence[Sample], img_size: tuple[int, int]) -> str:
    digest = hashlib.sha1()
    digest.update(json.dumps({"version": CACHE_VERSION, "img_size": list(img_size)}).encode())
    for sample in samples:
        for path in (sample.image, sample.mask):
            if path is None:
                digest.update(b"-")
                continue
            stat = os.stat(path)
            # Path, size and modification time: a changed or replaced file gives a new cache.
            digest.update(f"{sample.id}|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def build_cache(samples: Sequence[Sample], img_size: tuple[int, int], cache_dir: str | os.PathLike,
                workers: int = 4, progress: bool = False) -> str:
    """Decode, check and resize every sample once into ``<cache_dir>/<key>/{images,masks,sizes}.npy``.

    The key hashes the files' paths, sizes and modification times and ``img_size``, so a changed data set gets a
    new cache. The folder is written under a temporary name and renamed into place, so a killed build never
    leaves a half cache behind. Returns the cache folder.
    """
    img_size = (int(img_size[0]), int(img_size[1]))
    cache_dir = os.path.expanduser(os.fspath(cache_dir))
    target = os.path.join(cache_dir, _cache_key(samples, img_size))
    if os.path.isfile(os.path.join(target, "meta.json")):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
    try:
        count, (height, width) = len(samples), img_size
        images = np.lib.format.open_memmap(os.path.join(scratch, "images.npy"), "w+", np.uint8, (count, height, width, 3))
        masks = np.lib.format.open_memmap(os.path.join(scratch, "masks.npy"), "w+", np.uint8, (count, height, width))
        sizes = np.zeros((count, 2), np.int64)
        has_mask = all(s.mask is not None for s in samples)

        def fill(i):
            image, mask, original = load_sample(samples[i], img_size)
            images[i] = image
            masks[i] = mask if mask is not None else 0
            sizes[i] = original

        iterator = range(count)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
            results = pool.map(fill, iterator)
            if progress:
                from tqdm import tqdm
                results = tqdm(results, total=count, desc="caching resized images", unit="img")
            for _ in results:
                pass
        images.flush()
        masks.flush()
        del images, masks
        np.save(os.path.join(scratch, "sizes.npy"), sizes)
        with open(os.path.join(scratch, "meta.json"), "w") as handle:
            json.dump({"version": CACHE_VERSION, "img_size": list(img_size), "has_mask": has_mask,
                       "ids": [s.id for s in samples], "images": [s.image for s in samples]}, handle)
        try:
            os.replace(scratch, target)
        except OSError:
            # Another process (another rank, or a concurrent run) finished the same cache first.
            if not os.path.isfile(os.path.join(target, "meta.json")):
                raise
    finally:
        if os.path.isdir(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
    return target


class SegmentationDataset(torch.utils.data.Dataset):
    """Images and masks resized to ``img_size``, from disk or from a memory-mapped cache.

    Args:
        samples: from :func:`discover` (or any list of :class:`Sample`).
        img_size: (height, width) of the model input.
        cache_dir: None to decode files on every access; else a folder for :func:`build_cache` (built on first
            use unless ``build=False``, then an existing cache is required).
    Items are dicts: ``image`` (3, H, W) uint8, ``mask`` (1, H, W) uint8 in {0, 1} (zeros when the sample has no
    mask), ``id``, ``index``, ``original_size`` (2,) int64 = (height, width) of the file on disk.

        >>> ds = SegmentationDataset(discover("/data/PH2Dataset"), (192, 256), cache_dir="/tmp/cache")
    """

    def __init__(self, samples: Sequence[Sample], img_size: tuple[int, int] = (192, 256),
                 cache_dir: str | os.PathLike | None = None, workers: int = 4, progress: bool = False):
        if len(samples) == 0:
            raise DataError("no samples given")
        self.samples = list(samples)
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.cache_path = None
        self._arrays = None
        if cache_dir is not None:
            self.cache_path = build_cache(self.samples, self.img_size, cache_dir, workers, progress)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def _open_cache(self):
        # Opened lazily, per process: a memmap must not be pickled into DataLoader workers.
        if self._arrays is None:
            load = lambda name: np.load(os.path.join(self.cache_path, name), mmap_mode="r")
            self._arrays = (load("images.npy"), load("masks.npy"), np.load(os.path.join(self.cache_path, "sizes.npy")))
        return self._arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        if self.cache_path is not None:
            images, masks, sizes = self._open_cache()
            image, mask, original = np.array(images[i]), np.array(masks[i]), tuple(sizes[i])
        else:
            image, mask, original = load_sample(self.samples[i], self.img_size)
            if mask is None:
                mask = np.zeros(self.img_size, np.uint8)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.array(mask, dtype=np.uint8)[None]),  # a writable copy
            "id": self.samples[i].id,
            "index": i,
            "original_size": torch.tensor(original, dtype=torch.int64),
        }
