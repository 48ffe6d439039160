"""Data: the synthetic set, folder layouts and their errors, the cache, augmentations, splits."""

import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from dermomamba.data import (DataError, PublishedAugmentation, SegmentationDataset, SyntheticLesionDataset,
                             detect_layout, discover, find_image_mask_pairs, find_isic2018, find_ph2, list_images,
                             load_split, published_split, random_split, read_mask, render_lesion, save_split,
                             train_test_split_indices, write_synthetic_dataset)
from dermomamba.data.augment import rotation_theta


def _rng(seed):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_by_seed_and_index(seed):
    rng = _rng(seed)
    stream, index = int(rng.integers(0, 2 ** 31)), int(rng.integers(0, 10 ** 6))
    height, width = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    image, mask = render_lesion(stream, index, (height, width))
    again, mask_again = render_lesion(stream, index, (height, width))
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, mask_again)
    other, _ = render_lesion(stream, index + 1, (height, width))
    assert not np.array_equal(image, other)


def test_synthetic_lesions_are_visible_and_varied(seed):
    # Lesions are darker than the skin around them, neither empty nor the whole image, and vary in size.
    rng = _rng(seed)
    stream = int(rng.integers(0, 2 ** 31))
    fractions, hairy = [], 0
    for index in range(12):
        image, mask = render_lesion(stream, index, (96, 128))
        lesion, skin = mask.astype(bool), ~mask.astype(bool)
        assert 0.01 < lesion.mean() < 0.9
        grey = image.astype(float).mean(axis=2)
        assert grey[lesion].mean() < grey[skin].mean() - 10
        fractions.append(lesion.mean())
        # Hair: thin strokes much darker than their neighbourhood, on skin away from the lesion border.
        # (A quarter of the images have no hair; 2 in 3 show some on this test's 96x128 crop.)
        away = ndimage.binary_erosion(skin, iterations=4)
        drop = ndimage.median_filter(grey, 7) - grey
        hairy += int((drop[away] > 20).mean() > 0.003)
    assert np.std(fractions) > 0.02
    assert hairy >= 3


def test_synthetic_dataset_items_and_workers(seed):
    offset = int(_rng(seed).integers(0, 1000))
    dataset = SyntheticLesionDataset(6, img_size=(40, 72), seed=3, offset=offset)
    item = dataset[2]
    assert item["image"].shape == (3, 40, 72) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (1, 40, 72) and item["mask"].dtype == torch.uint8
    assert item["id"] == f"synthetic_{offset + 2:07d}" and item["index"] == 2
    assert item["original_size"].tolist() == [40, 72]
    image, mask = render_lesion(3, offset + 2, (40, 72))
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), image)
    # Worker processes render the same samples as the main process.
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1)
    batches = list(loader)
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), torch.stack([dataset[i]["image"] for i in range(6)]))
    with pytest.raises(IndexError):
        dataset[6]


def test_synthetic_cache_equals_on_the_fly(tmp_path, seed):
    stream, offset = seed % 1000, int(_rng(seed).integers(0, 100))
    cached = SyntheticLesionDataset(5, (40, 56), seed=stream, offset=offset, cache_dir=tmp_path, workers=2)
    plain = SyntheticLesionDataset(5, (40, 56), seed=stream, offset=offset)
    for i in range(5):
        a, b = cached[i], plain[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["id"] == b["id"]
    assert isinstance(cached._arrays[0], np.memmap)
    assert pickle.loads(pickle.dumps(cached))._arrays is None
    assert SyntheticLesionDataset(5, (40, 56), seed=stream, offset=offset, cache_dir=tmp_path).cache_path == cached.cache_path
    assert SyntheticLesionDataset(5, (40, 56), seed=stream + 1, cache_dir=tmp_path).cache_path != cached.cache_path


# ------------------------------------------------------------------------------------------------ layouts
def test_isic_layout_pairs_ids_and_skips_non_images(tmp_path, seed):
    sizes = [(40, 60), (52, 44), (33, 71)]
    ids = write_synthetic_dataset(tmp_path, 5, "isic2018", sizes=sizes, seed=seed % 1000)
    image_dir = tmp_path / "ISIC2018_Task1-2_Training_Input"
    mask_dir = tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    # Distractors of the real downloads: 2017's superpixel images and the licence files.
    Image.new("RGB", (10, 10)).save(image_dir / "ISIC_0000000_superpixels.png")
    (image_dir / "notes.md").write_text("not an image")
    # 2016/2017 spelled the suffix with a capital S.
    os.rename(mask_dir / "ISIC_0000003_segmentation.png", mask_dir / "ISIC_0000003_Segmentation.PNG")
    samples = find_isic2018(tmp_path)
    assert [s.id for s in samples] == ids
    assert samples[3].mask.endswith("ISIC_0000003_Segmentation.PNG")
    assert detect_layout(tmp_path) == "isic2018"
    assert [s.id for s in discover(tmp_path)] == ids
    # The input folder itself also works.
    assert [s.id for s in find_isic2018(image_dir)] == ids
    for i, sample in enumerate(samples):
        mask = read_mask(sample.mask)
        np.testing.assert_array_equal(mask, render_lesion(seed % 1000, i, sizes[i % 3])[1])


def test_isic_missing_mask_and_orphan_mask_are_named(tmp_path):
    write_synthetic_dataset(tmp_path, 3, "isic2018", sizes=[(32, 48)])
    mask_dir = tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    os.remove(mask_dir / "ISIC_0000001_segmentation.png")
    with pytest.raises(DataError, match=r"missing mask for image .*ISIC_0000001\.jpg"):
        find_isic2018(tmp_path)
    Image.new("L", (48, 32)).save(mask_dir / "ISIC_0000001_segmentation.png")
    Image.new("L", (48, 32)).save(mask_dir / "ISIC_0000009_segmentation.png")
    with pytest.raises(DataError, match=r"mask without its image: .*ISIC_0000009_segmentation\.png"):
        find_isic2018(tmp_path)


def test_ph2_layout_reads_rgb_masks_thresholded(tmp_path, seed):
    ids = write_synthetic_dataset(tmp_path, 3, "ph2", sizes=[(45, 61)], seed=seed % 1000)
    assert ids == ["IMD002", "IMD003", "IMD004"]
    assert detect_layout(tmp_path) == "ph2"
    samples = find_ph2(tmp_path)
    assert [s.id for s in samples] == ids
    assert Image.open(samples[0].mask).mode == "RGB"
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(read_mask(sample.mask), render_lesion(seed % 1000, i, (45, 61))[1])
    # Grey levels around the threshold: > 128 is lesion.
    grey = np.array([[0, 127, 128, 129, 255]], np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(samples[1].mask)
    assert read_mask(samples[1].mask).tolist() == [[0, 0, 0, 1, 1]]
    # The 'PH2 Dataset images' folder itself is accepted too.
    assert [s.id for s in find_ph2(tmp_path / "PH2 Dataset images")] == ids
    os.remove(samples[2].mask)
    with pytest.raises(DataError, match="missing mask for image .*IMD004.bmp"):
        find_ph2(tmp_path)


def test_plain_folder_pairs_suffixes_and_rejects_duplicates(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a.jpg", "b.png", "c.bmp"):
        Image.new("RGB", (20, 10)).save(images / name)
    Image.new("L", (20, 10)).save(masks / "a.png")
    Image.new("L", (20, 10)).save(masks / "b_MASK.png")
    Image.new("L", (20, 10)).save(masks / "c_segmentation.png")
    (images / "README.txt").write_text("skip me")
    (masks / "Thumbs.db").write_bytes(b"\0")
    samples = find_image_mask_pairs(tmp_path)
    assert [(s.id, os.path.basename(s.mask)) for s in samples] == [
        ("a", "a.png"), ("b", "b_MASK.png"), ("c", "c_segmentation.png")]
    assert detect_layout(tmp_path) == "folder"
    Image.new("RGB", (20, 10)).save(images / "a.png")
    with pytest.raises(DataError, match="two files have the id 'a'"):
        find_image_mask_pairs(tmp_path)


def test_corrupt_truncated_and_mismatched_files_are_named(tmp_path):
    write_synthetic_dataset(tmp_path, 3, "folder", sizes=[(30, 40)])
    samples = find_image_mask_pairs(tmp_path)
    # Garbage bytes under an image name.
    with open(samples[0].image, "wb") as handle:
        handle.write(os.urandom(300))
    with pytest.raises(DataError, match=r"cannot read image file .*case0000\.png"):
        SegmentationDataset(samples, (32, 32))[0]
    # A truncated file: PIL opens the header lazily; the loader must force the decode.
    data = open(samples[1].image, "rb").read()
    with open(samples[1].image, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"case0001\.png"):
        SegmentationDataset(samples, (32, 32))[1]
    # Mask of another size.
    Image.new("L", (41, 30)).save(samples[2].mask)
    with pytest.raises(DataError, match=r"size mismatch: image .*case0002\.png is 40x30 but its mask .*case0002\.png is 41x30"):
        SegmentationDataset(samples, (32, 32))[2]
    # The cache builder reports the same errors (from its worker threads).
    with pytest.raises(DataError, match="case000"):
        SegmentationDataset(samples, (32, 32), cache_dir=tmp_path / "cache")
    assert not [p for p in os.listdir(tmp_path / "cache") if not p.startswith(".")]


def test_list_images_for_prediction(tmp_path):
    (tmp_path / "x").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "x" / "one.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "two.png")
    (tmp_path / "x" / "LICENSE.txt").write_text("")
    samples = list_images([tmp_path / "x", tmp_path / "two.png"])
    assert [s.id for s in samples] == ["one", "two"]
    with pytest.raises(DataError, match="input not found"):
        list_images([tmp_path / "missing"])
    with pytest.raises(DataError, match="not an image file"):
        list_images([tmp_path / "x" / "LICENSE.txt"])


# ------------------------------------------------------------------------------------------------ dataset + cache
def test_dataset_resizes_like_pil_and_cache_matches(tmp_path, seed):
    sizes = [(37, 53), (64, 40)]
    write_synthetic_dataset(tmp_path / "data", 4, "isic2018", sizes=sizes, seed=seed % 1000)
    samples = discover(tmp_path / "data")
    img_size = (32, 64)
    plain = SegmentationDataset(samples, img_size)
    cached = SegmentationDataset(samples, img_size, cache_dir=tmp_path / "cache", workers=2)
    for i, sample in enumerate(samples):
        a, b = plain[i], cached[i]
        original = Image.open(sample.image).convert("RGB")
        expected = np.asarray(original.resize((64, 32), Image.BILINEAR))
        np.testing.assert_array_equal(a["image"].permute(1, 2, 0).numpy(), expected)
        mask = Image.fromarray(read_mask(sample.mask)).resize((64, 32), Image.NEAREST)
        np.testing.assert_array_equal(a["mask"][0].numpy(), np.asarray(mask))
        assert set(np.unique(a["mask"].numpy())) <= {0, 1}
        assert a["original_size"].tolist() == [original.height, original.width]
        for key in ("image", "mask", "original_size"):
            torch.testing.assert_close(a[key], b[key])
        assert a["id"] == b["id"] == sample.id
    images, _, _ = cached._open_cache()
    assert isinstance(images, np.memmap)
    # Workers get the dataset without its open memory maps.
    assert pickle.loads(pickle.dumps(cached))._arrays is None
    # The same files reuse the cache; a changed file gets a new one.
    again = SegmentationDataset(samples, img_size, cache_dir=tmp_path / "cache")
    assert again.cache_path == cached.cache_path
    os.utime(samples[0].image, ns=(1, 1))
    changed = SegmentationDataset(samples, img_size, cache_dir=tmp_path / "cache")
    assert changed.cache_path != cached.cache_path


# ------------------------------------------------------------------------------------------------ augmentation
def _params(batch, **overrides):
    base = {"crop": None, "angle": None, "hflip": False, "vflip": False}
    return [dict(base, **overrides) for _ in range(batch)]


def test_augment_flips_and_rotations_are_exact(seed):
    augment = PublishedAugmentation()
    height, width = 6 + seed % 7, 9 + seed % 5
    images = torch.rand(2, 3, height, width)
    masks = (torch.rand(2, 1, height, width) > 0.5).float()
    out, out_masks = augment.apply(images, masks, _params(2, hflip=True))
    torch.testing.assert_close(out, images.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(out_masks, masks.flip(-1), rtol=0, atol=0)
    out, _ = augment.apply(images, masks, _params(2, vflip=True))
    torch.testing.assert_close(out, images.flip(-2), rtol=0, atol=0)
    # 180 degrees on H != W maps pixel centres onto pixel centres: nearest sampling is exact.
    out, out_masks = augment.apply(images, masks, _params(2, angle=180.0))
    torch.testing.assert_close(out, images.flip(-1, -2), rtol=0, atol=0)
    torch.testing.assert_close(out_masks, masks.flip(-1, -2), rtol=0, atol=0)
    # 90 degrees on a square image is rot90 (one direction or the other).
    square = torch.rand(1, 3, 7, 7)
    out, _ = augment.apply(square, square[:, :1], _params(1, angle=90.0))
    assert torch.equal(out, torch.rot90(square, 1, (-2, -1))) or torch.equal(out, torch.rot90(square, -1, (-2, -1)))
    # Nothing drawn: the input unchanged.
    out, out_masks = augment.apply(images, masks, _params(2))
    assert torch.equal(out, images) and torch.equal(out_masks, masks)


def test_augment_small_rotation_keeps_aspect_and_mask_binary(seed):
    # A disc stays a disc of the same area under rotation only if the H != W aspect is handled.
    height, width = 48, 80
    yy, xx = torch.meshgrid(torch.arange(height) - height / 2 + 0.5, torch.arange(width) - width / 2 + 0.5, indexing="ij")
    disc = ((yy ** 2 + xx ** 2) < 15 ** 2).float()[None, None]
    angle = float(np.random.default_rng(seed).uniform(-15, 15))
    out, out_mask = PublishedAugmentation().apply(disc.repeat(1, 3, 1, 1), disc, _params(1, angle=angle))
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(out_mask.sum().item() - disc.sum().item()) < 0.03 * disc.sum().item()
    # Identical geometry for image and mask.
    torch.testing.assert_close(out[:, :1], out_mask, rtol=0, atol=0)


def test_augment_crop_matches_interpolated_slice(seed):
    rng = np.random.default_rng(seed)
    height, width = 24, 40
    top, left = int(rng.integers(0, 4)), int(rng.integers(0, 6))
    crop_h, crop_w = int(rng.integers(18, height - top + 1)), int(rng.integers(30, width - left + 1))
    images = torch.rand(1, 3, height, width)
    masks = (torch.rand(1, 1, height, width) > 0.5).float()
    out, out_masks = PublishedAugmentation().apply(images, masks, _params(1, crop=(top, left, crop_h, crop_w)))
    expected = F.interpolate(images[..., top:top + crop_h, left:left + crop_w], size=(height, width),
                             mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    expected_mask = F.interpolate(masks[..., top:top + crop_h, left:left + crop_w], size=(height, width),
                                  mode="bilinear", align_corners=False) >= 0.5
    torch.testing.assert_close(out_masks, expected_mask.float(), rtol=0, atol=0)
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}


def test_augment_draws_published_probabilities(seed):
    augment = PublishedAugmentation()
    generator = torch.Generator().manual_seed(seed)
    count = 4000
    params = augment.sample_params(count, 192, 256, generator)
    for key, p in (("crop", 0.1), ("angle", 0.5), ("hflip", 0.5), ("vflip", 0.5)):
        hits = sum(1 for q in params if (q[key] is not None if key in ("crop", "angle") else q[key]))
        assert abs(hits - p * count) < 5 * np.sqrt(count * p * (1 - p)), key
    angles = [q["angle"] for q in params if q["angle"] is not None]
    assert -15 <= min(angles) < -14 and 14 < max(angles) <= 15
    for q in params:
        if q["crop"] is not None:
            top, left, h, w = q["crop"]
            assert 0 <= top and top + h <= 192 and 0 <= left and left + w <= 256
            if (h, w) == (192, 256):
                continue  # torchvision's fallback after 10 failed tries: the whole image (4:3 is within the ratios)
            assert 0.78 < h * w / (192 * 256) < 0.97
            assert 3 / 4 - 0.02 < w / h < 4 / 3 + 0.02
    # The same generator state gives the same augmentation.
    images = torch.rand(3, 3, 32, 48)
    masks = (torch.rand(3, 1, 32, 48) > 0.5).float()
    state = generator.get_state()
    first = augment(images, masks, generator)
    generator.set_state(state)
    second = augment(images, masks, generator)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_affine_matrices():
    assert torch.allclose(rotation_theta(0.0, 10, 20), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="differ in batch or size"):
        PublishedAugmentation().apply(torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 9), _params(2))


# ------------------------------------------------------------------------------------------------ splits
# scikit-learn 1.9.1, train_test_split([f"ISIC_{i:07d}" for i in range(2594)], test_size=520, random_state=257):
# the first and last ids of each part (recorded from scikit-learn itself, for machines without it).
SKLEARN_TEST_HEAD = ["ISIC_0000168", "ISIC_0000220", "ISIC_0001122", "ISIC_0001754", "ISIC_0001538", "ISIC_0000528"]
SKLEARN_TEST_TAIL = ["ISIC_0001438", "ISIC_0002561"]
SKLEARN_TRAIN_HEAD = ["ISIC_0000069", "ISIC_0002568", "ISIC_0000164", "ISIC_0000539", "ISIC_0001406", "ISIC_0002422"]
SKLEARN_TRAIN_TAIL = ["ISIC_0000425", "ISIC_0001174"]


def test_published_split_matches_recorded_sklearn_output():
    ids = [f"ISIC_{i:07d}" for i in range(2594)]
    shuffled = ids[:]
    random.shuffle(shuffled)  # the split sorts the ids first
    split = published_split(shuffled)
    assert len(split["train"]) == 2074 and len(split["val"]) == 520 and split["val"] == split["test"]
    assert split["val"][:6] == SKLEARN_TEST_HEAD and split["val"][-2:] == SKLEARN_TEST_TAIL
    assert split["train"][:6] == SKLEARN_TRAIN_HEAD and split["train"][-2:] == SKLEARN_TRAIN_TAIL
    assert sorted(split["train"] + split["val"]) == ids


def test_split_equals_sklearn(seed):
    sklearn = pytest.importorskip("sklearn.model_selection")
    rng = np.random.default_rng(seed)
    for _ in range(5):
        n = int(rng.integers(10, 3000))
        test_size = float(rng.uniform(0.05, 0.5)) if rng.random() < 0.5 else int(rng.integers(1, n - 1))
        state = int(rng.integers(0, 2 ** 31))
        expected_train, expected_test = sklearn.train_test_split(np.arange(n), test_size=test_size, random_state=state)
        train, test = train_test_split_indices(n, test_size, state)
        np.testing.assert_array_equal(train, expected_train)
        np.testing.assert_array_equal(test, expected_test)


def test_random_split_is_disjoint_and_saved(tmp_path, seed):
    ids = [f"id{i:04d}" for i in range(int(np.random.default_rng(seed).integers(20, 200)))]
    split = random_split(ids, 0.15, 0.2, seed=seed)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(ids)
    assert len(split["val"]) == int(np.ceil(0.15 * len(ids))) and len(split["test"]) == int(np.ceil(0.2 * len(ids)))
    assert random_split(ids, 0.15, 0.2, seed=seed) == split
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == split
    with pytest.raises(ValueError, match="too few"):
        random_split(ids[:2], 0.4, 0.4)
