"""A built-in synthetic dermoscopy-like data set with exact ground-truth masks.

Each sample is drawn from its own random stream seeded by ``(seed, index)``, so sample ``i`` is the same
whatever order, worker or process asks for it, and nothing is stored: images are rendered on the fly at
any size. What is rendered, and why:

* skin: a skin-tone base colour with low-frequency blotches (erythema, uneven illumination) and fine
  grain, so the background is not a flat colour a model could threshold;
* the lesion: a union of one to three lobes, each a star-shaped curve ``r(theta)`` with random harmonics,
  stretched and rotated, so borders are irregular and multi-lobed like melanocytic lesions;
* lesion colour: two or three browns mixed by a smooth field (colour variegation), a pigment-network-like
  texture and dark globules;
* a soft border (the lesion fades into the skin over a few pixels); the mask is exactly the set of pixels
  inside the curve, i.e. where the lesion's opacity is above one half;
* hair: dark curved strokes crossing both skin and lesion (they do not change the mask, as in real
  annotations);
* vignetting, sometimes the dark circular frame of a dermoscope, and sensor noise.

    >>> ds = SyntheticLesionDataset(num_samples=8, img_size=(192, 256), seed=0)
    >>> sample = ds[3]
    >>> sample["image"].shape, sample["image"].dtype, sample["mask"].shape
    (torch.Size([3, 192, 256]), torch.uint8, torch.Size([1, 192, 256]))
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["render_lesion", "SyntheticLesionDataset", "write_synthetic_dataset", "SYNTHETIC_LAYOUTS"]

SYNTHETIC_LAYOUTS = ("isic2018", "ph2", "folder")

# Skin tones from fair to brown (RGB); a sample interpolates between two neighbours.
_SKIN_TONES = np.array([[238, 206, 186], [226, 184, 160], [205, 160, 128], [176, 128, 96], [140, 98, 70]],
                       dtype=np.float64)
# Lesion pigments: light brown, mid brown, dark brown, near black, blue-grey (regression structures).
_PIGMENTS = np.array([[176, 118, 80], [130, 80, 50], [88, 52, 34], [52, 34, 30], [104, 98, 120]],
                     dtype=np.float64)
_HARMONICS = np.arange(2, 8)
# Bump when render_lesion's output changes, so cached renderings of the old generator are not reused.
GENERATOR_VERSION = 2


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth noise in [0, 1], correlated over about ``sigma`` pixels (rendered coarse, then upsampled)."""
    height, width = shape
    # Blurring at full size costs O(sigma) per pixel; noise this smooth loses nothing at a coarser grid.
    step = max(1, int(sigma // 4))
    coarse = rng.standard_normal((height // step + 2, width // step + 2))
    coarse = ndimage.gaussian_filter(coarse, sigma / step, mode="wrap")
    field = ndimage.zoom(coarse, step, order=1)[:height, :width] if step > 1 else coarse[:height, :width]
    low, high = field.min(), field.max()
    return (field - low) / max(high - low, 1e-12)


def _lesion_signed_distance(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Approximate signed distance in pixels to the lesion border (negative inside)."""
    scale = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    centre = np.array([height, width]) * (0.5 + rng.uniform(-0.15, 0.15, size=2))
    main_radius = scale * rng.uniform(0.16, 0.34)
    stretch = rng.uniform(0.75, 1.3)
    tilt = rng.uniform(0, np.pi)
    distance = np.full((height, width), np.inf)
    for lobe in range(rng.integers(1, 4)):
        if lobe == 0:
            lobe_centre, radius = centre, main_radius
        else:
            angle = rng.uniform(0, 2 * np.pi)
            offset = main_radius * rng.uniform(0.5, 1.0)
            lobe_centre = centre + offset * np.array([np.sin(angle), np.cos(angle)])
            radius = main_radius * rng.uniform(0.4, 0.75)
        dy, dx = yy - lobe_centre[0], xx - lobe_centre[1]
        # Stretch along a tilted axis: elongated lesions.
        u = dx * np.cos(tilt) + dy * np.sin(tilt)
        v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) * stretch
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        amplitudes = rng.uniform(0, 0.22, size=_HARMONICS.size) / _HARMONICS ** 0.7
        phases = rng.uniform(0, 2 * np.pi, size=_HARMONICS.size)
        boundary = radius * (1 + np.tensordot(amplitudes, np.cos(np.multiply.outer(_HARMONICS, theta)
                                                                  + phases[:, None, None]), axes=1))
        distance = np.minimum(distance, rho - np.maximum(boundary, 0.2 * radius))
    return distance


def _draw_hairs(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Opacity in [0, 1] of a few dark curved hairs (quadratic Bezier strokes) crossing the image."""
    scale = min(height, width)
    count = 0 if rng.random() < 0.25 else int(rng.integers(1, 10))
    canvas = Image.new("L", (width, height), 0)
    if count == 0:
        return np.zeros((height, width))
    draw = ImageDraw.Draw(canvas)
    steps = np.linspace(0, 1, 24)[:, None]
    for _ in range(count):
        start = rng.uniform([0, 0], [width, height])
        angle = rng.uniform(0, 2 * np.pi)
        length = scale * rng.uniform(0.3, 1.2)
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        bend = (start + end) / 2 + rng.normal(0, 0.2 * length, size=2)
        points = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * bend + steps ** 2 * end
        thickness = max(1, int(round(scale * rng.uniform(0.004, 0.014))))
        draw.line([tuple(p) for p in points], fill=int(255 * rng.uniform(0.6, 0.95)), width=thickness,
                  joint="curve")
    # A slight blur so strokes have anti-aliased edges rather than staircase pixels.
    return ndimage.gaussian_filter(np.asarray(canvas, dtype=np.float64) / 255.0, 0.6)


def render_lesion(seed: int, index: int, img_size: tuple[int, int] = (192, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Render synthetic sample ``index`` of stream ``seed``.

    Args:
        seed, index: non-negative integers; the same pair always gives the same sample.
        img_size: (height, width) of the output.
    Returns:
        image: (H, W, 3) uint8 RGB; mask: (H, W) uint8 with 1 inside the lesion, 0 outside.

        >>> image, mask = render_lesion(0, 5, (96, 128))
        >>> image.shape, mask.shape, sorted(np.unique(mask).tolist())
        ((96, 128, 3), (96, 128), [0, 1])
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    height, width = (int(v) for v in img_size)
    if height < 8 or width < 8:
        raise ValueError(f"img_size must be at least 8x8, got {img_size}")
    rng = np.random.default_rng([int(seed), int(index)])
    scale = min(height, width)

    tone = rng.uniform(0, len(_SKIN_TONES) - 1.001)
    low = int(tone)
    skin_colour = _SKIN_TONES[low] * (1 - (tone - low)) + _SKIN_TONES[low + 1] * (tone - low)
    skin_colour = skin_colour * rng.uniform(0.92, 1.06, size=3)
    blotch = _smooth_field(rng, (height, width), scale * 0.12)
    redness = np.array([1.0, 0.78, 0.78]) * rng.uniform(10, 30)
    skin = skin_colour + (blotch[..., None] - 0.5) * redness
    skin = skin + rng.normal(0, 2.5, size=(height, width, 1))

    distance = _lesion_signed_distance(rng, height, width)
    mask = (distance < 0).astype(np.uint8)
    softness = scale * rng.uniform(0.004, 0.02)
    alpha = 1.0 / (1.0 + np.exp(np.clip(distance / softness, -50, 50)))

    chosen = _PIGMENTS[rng.choice(len(_PIGMENTS), size=3, replace=rng.random() < 0.3)]
    mix = _smooth_field(rng, (height, width), scale * rng.uniform(0.03, 0.08))
    mix2 = _smooth_field(rng, (height, width), scale * 0.05)
    lesion = (chosen[0] * (1 - mix[..., None]) + chosen[1] * mix[..., None])
    lesion = lesion * (1 - 0.5 * mix2[..., None] ** 3) + chosen[2] * 0.5 * mix2[..., None] ** 3
    # Lesions are darker than the skin they sit on (a light-brown naevus on dark skin would otherwise vanish).
    contrast = rng.uniform(0.35, 0.8)
    brightness = lesion.mean() / skin_colour.mean()
    if brightness > contrast:
        lesion = lesion * (contrast / brightness)
    # Darker towards the centre, as many naevi are.
    depth = np.clip(-distance / (scale * 0.25), 0, 1)[..., None]
    lesion = lesion * (1 - rng.uniform(0.0, 0.35) * depth)
    # Pigment-network-like mesh, warped by a smooth field so it is not a regular grid.
    period = scale * rng.uniform(0.025, 0.05)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    warp = _smooth_field(rng, (height, width), scale * 0.05) * period * 2
    mesh = np.abs(np.sin(np.pi * (xx + warp) / period) * np.sin(np.pi * (yy - warp) / period))
    lesion = lesion * (1 - rng.uniform(0.03, 0.15) * (mesh[..., None] < 0.3))
    # Dark globules.
    globules = np.zeros((height, width))
    for _ in range(int(rng.integers(0, 25))):
        gy, gx = rng.uniform([0, 0], [height, width])
        radius = scale * rng.uniform(0.006, 0.018)
        globules = np.maximum(globules, np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / (2 * radius ** 2)))
    lesion = lesion * (1 - 0.6 * globules[..., None])

    image = skin * (1 - alpha[..., None]) + lesion * alpha[..., None]

    hair = _draw_hairs(rng, height, width)[..., None]
    hair_colour = rng.uniform(15, 60) * np.array([1.0, 0.9, 0.85])
    image = image * (1 - hair) + hair_colour * hair

    # Vignetting: illumination falls off towards the corners.
    radial = np.hypot((yy - height / 2) / (height / 2), (xx - width / 2) / (width / 2)) / np.sqrt(2)
    image = image * (1 - rng.uniform(0.05, 0.4) * radial[..., None] ** 2) * rng.uniform(0.85, 1.1)
    if rng.random() < 0.25:
        # The dark circular field stop of a contact dermoscope.
        aperture = rng.uniform(0.85, 1.0) * np.sqrt(2)
        edge = np.clip((radial * np.sqrt(2) - aperture) / 0.05, 0, 1)[..., None]
        image = image * (1 - 0.9 * edge)
    image = image + rng.normal(0, 2.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


class SyntheticLesionDataset(torch.utils.data.Dataset):
    """Synthetic dermoscopy-like images with exact masks, rendered on the fly.

    Args:
        num_samples: length of the data set.
        img_size: (height, width) of every sample.
        seed: stream seed; sample ``i`` is ``render_lesion(seed, offset + i, img_size)``.
        offset: first index of the stream (gives disjoint train/val/test sets from one seed).
        cache_dir: None renders on every access; a folder renders every sample once (``workers`` processes) into
            memory-mapped arrays there, reused by later data sets of the same seed, offset, length and size.
    Items are dicts: ``image`` (3, H, W) uint8, ``mask`` (1, H, W) uint8 in {0, 1}, ``id`` (str),
    ``index`` (int), ``original_size`` (2,) int64 = (H, W) — the same keys as the folder data sets.

        >>> ds = SyntheticLesionDataset(4, img_size=(64, 96))
        >>> ds[0]["id"], ds[0]["image"].shape
        ('synthetic_0000000', torch.Size([3, 64, 96]))
    """

    def __init__(self, num_samples: int, img_size: tuple[int, int] = (192, 256), seed: int = 0, offset: int = 0,
                 cache_dir: str | os.PathLike | None = None, workers: int = 4):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.seed = int(seed)
        self.offset = int(offset)
        self.cache_path = None
        self._arrays = None
        if cache_dir is not None and self.num_samples > 0:
            # Rendering costs tens of milliseconds per 192x256 sample: a GPU epoch would wait for it.
            self.cache_path = self._render_cache(os.path.expanduser(os.fspath(cache_dir)), workers)

    def _render_cache(self, cache_dir: str, workers: int) -> str:
        key = hashlib.sha1(f"synthetic|{GENERATOR_VERSION}|{self.seed}|{self.offset}|{self.num_samples}|"
                           f"{self.img_size}".encode()).hexdigest()[:20]
        target = os.path.join(cache_dir, f"synthetic-{key}")
        if os.path.isfile(os.path.join(target, "masks.npy")):
            return target
        os.makedirs(cache_dir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
        try:
            height, width = self.img_size
            images = np.lib.format.open_memmap(os.path.join(scratch, "images.npy"), "w+", np.uint8,
                                               (self.num_samples, height, width, 3))
            masks = np.zeros((self.num_samples, height, width), np.uint8)
            indices = range(self.offset, self.offset + self.num_samples)
            with ProcessPoolExecutor(max(1, workers)) as pool:
                rendered = pool.map(render_lesion, [self.seed] * self.num_samples, indices,
                                    [self.img_size] * self.num_samples, chunksize=16)
                for i, (image, mask) in enumerate(rendered):
                    images[i], masks[i] = image, mask
            images.flush()
            del images
            # masks.npy last: its presence marks a complete cache.
            np.save(os.path.join(scratch, "masks.npy"), masks)
            try:
                os.replace(scratch, target)
            except OSError:
                if not os.path.isfile(os.path.join(target, "masks.npy")):
                    raise
        finally:
            if os.path.isdir(scratch):
                shutil.rmtree(scratch, ignore_errors=True)
        return target

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None  # memory maps are reopened in each worker process
        return state

    def __len__(self) -> int:
        return self.num_samples

    @property
    def ids(self) -> list[str]:
        return [self.sample_id(i) for i in range(self.num_samples)]

    def sample_id(self, i: int) -> str:
        return f"synthetic_{self.offset + i:07d}"

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        if self.cache_path is not None:
            if self._arrays is None:
                self._arrays = tuple(np.load(os.path.join(self.cache_path, name), mmap_mode="r")
                                     for name in ("images.npy", "masks.npy"))
            image, mask = np.array(self._arrays[0][i]), np.array(self._arrays[1][i])
        else:
            image, mask = render_lesion(self.seed, self.offset + i, self.img_size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask[None]),
            "id": self.sample_id(i),
            "index": i,
            "original_size": torch.tensor(self.img_size, dtype=torch.int64),
        }


def _write_sample(root: str, layout: str, seed: int, index: int, size: tuple[int, int], subset: str) -> str:
    image, mask = render_lesion(seed, index, size)
    image_pil = Image.fromarray(image)
    mask_pil = Image.fromarray(mask * 255)
    if layout == "isic2018":
        sample_id = f"ISIC_{index:07d}"
        image_pil.save(os.path.join(root, f"ISIC2018_Task1-2_{subset}_Input", sample_id + ".jpg"), quality=95)
        mask_pil.save(os.path.join(root, f"ISIC2018_Task1_{subset}_GroundTruth", sample_id + "_segmentation.png"))
    elif layout == "ph2":
        sample_id = f"IMD{index + 2:03d}"
        case = os.path.join(root, "PH2 Dataset images", sample_id)
        os.makedirs(os.path.join(case, f"{sample_id}_Dermoscopic_Image"), exist_ok=True)
        os.makedirs(os.path.join(case, f"{sample_id}_lesion"), exist_ok=True)
        image_pil.save(os.path.join(case, f"{sample_id}_Dermoscopic_Image", f"{sample_id}.bmp"))
        # PH2's lesion masks read as 3-channel images.
        mask_pil.convert("RGB").save(os.path.join(case, f"{sample_id}_lesion", f"{sample_id}_lesion.bmp"))
    else:
        sample_id = f"case{index:04d}"
        image_pil.save(os.path.join(root, "images", sample_id + ".png"))
        mask_pil.save(os.path.join(root, "masks", sample_id + ".png"))
    return sample_id


def write_synthetic_dataset(root: str | os.PathLike, num_samples: int, layout: str = "folder",
                            sizes=((192, 256),), seed: int = 0, subset: str = "Training",
                            workers: int = 0) -> list[str]:
    """Write synthetic samples to disk in one of the supported folder layouts; returns the ids.

    Args:
        root: folder to write into (created).
        num_samples: number of image/mask pairs.
        layout: "isic2018" (JPEG images, ``<id>_segmentation.png`` masks, plus LICENSE/ATTRIBUTION files as in
            the official download), "ph2" (BMP images and 3-channel BMP lesion masks in per-case folders) or
            "folder" (``images/<id>.png`` + ``masks/<id>.png``).
        sizes: (height, width) pairs cycled over the samples, so images vary in size as real ones do.
        seed: synthetic stream seed.
        subset: ISIC subset name in the folder names ("Training", "Validation", "Test").
        workers: processes that render and encode samples (0: in this process). A 768x1024 sample takes
            most of a second to render, so large folders want several.

        >>> ids = write_synthetic_dataset("/tmp/synth", 4, layout="isic2018", sizes=[(60, 80), (75, 100)])
    """
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"layout must be one of {SYNTHETIC_LAYOUTS}, got {layout!r}")
    root = os.fspath(root)
    sizes = [tuple(int(v) for v in s) for s in sizes]
    if not sizes:
        raise ValueError("sizes must hold at least one (height, width) pair")
    if layout == "isic2018":
        image_dir = os.path.join(root, f"ISIC2018_Task1-2_{subset}_Input")
        mask_dir = os.path.join(root, f"ISIC2018_Task1_{subset}_GroundTruth")
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        for folder in (image_dir, mask_dir):
            for name in ("LICENSE.txt", "ATTRIBUTION.txt"):
                with open(os.path.join(folder, name), "w") as handle:
                    handle.write("synthetic data, generated by dermomamba\n")
    elif layout == "folder":
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    jobs = [(root, layout, seed, i, sizes[i % len(sizes)], subset) for i in range(num_samples)]
    if workers > 0 and num_samples > 1:
        with ProcessPoolExecutor(min(workers, num_samples)) as pool:
            ids = list(pool.map(_write_sample, *zip(*jobs), chunksize=4))
    else:
        ids = [_write_sample(*job) for job in jobs]
    return ids
