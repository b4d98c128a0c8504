"""Data layer: loading, transforms, views, settings (docs/methods.md#data). CPU only, no network."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from okdph.data import (
    DATASETS, SETTINGS, VIEWS, Cutout, DataError, build_test_set, build_test_transform, build_train_set,
    build_train_transform, get_info, limited_indices, load_arrays,
)
from okdph.data.digits import DIGITS_SIZES


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------------------------------------
# Fake CIFAR files in torchvision's on-disk layout
# ------------------------------------------------------------------------------------------------

def _write(path, obj) -> str:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar(root, name: str, rng: np.random.Generator):
    """Write tiny CIFAR pickles; return (md5 by file name, train images, train labels, test images, labels)."""
    if name == "cifar10":
        folder, train_files, test_files, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
        label_key, num_classes, per_file = "labels", 10, 4
    else:
        folder, train_files, test_files, meta = "cifar-100-python", ["train"], ["test"], \
            ("meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})
        label_key, num_classes, per_file = "fine_labels", 100, 12
    d = root / folder
    d.mkdir(parents=True)
    md5 = {}
    split = {}
    for kind, files in (("train", train_files), ("test", test_files)):
        images, labels = [], []
        for f in files:
            x = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
            y = rng.integers(0, num_classes, per_file).tolist()
            entry = {"data": x, label_key: y}
            if name == "cifar100":
                entry["coarse_labels"] = [0] * per_file
            md5[f] = _write(d / f, entry)
            images.append(x)
            labels += y
        split[kind] = (np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
    md5[meta[0]] = _write(d / meta[0], meta[1])
    return md5, split


def _patch_md5(monkeypatch, cls, md5: dict) -> None:
    monkeypatch.setattr(cls, "train_list", [[f, md5[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5[cls.meta["filename"]]))


_CIFAR_CLASSES = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_md5_checked_fakes(tmp_path, monkeypatch, name):
    md5, split = _fake_cifar(tmp_path, name, np.random.default_rng(0))
    _patch_md5(monkeypatch, _CIFAR_CLASSES[name], md5)
    for train, key in ((True, "train"), (False, "test")):
        images, targets = load_arrays(name, tmp_path, train=train)
        assert images.dtype == np.uint8 and images.shape == (len(split[key][1]), 32, 32, 3)
        assert targets.dtype == np.int64
        np.testing.assert_array_equal(images, split[key][0])
        np.testing.assert_array_equal(targets, split[key][1])
    ds = build_train_set(name, tmp_path, ["hflip", "cutout"])
    x, y = ds[0]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    np.testing.assert_array_equal(ds.images, split["train"][0])
    assert build_test_set(name, tmp_path)[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_corrupted_or_missing_is_one_line_data_error(tmp_path, name):
    _fake_cifar(tmp_path / "fake", name, np.random.default_rng(0))  # md5s differ from the real files
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "fake", tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(DataError) as err:
            load_arrays(name, root, train=True)
        msg = _one_line(err)
        assert "--download" in msg and str(root) in msg
        with pytest.raises(DataError):
            build_test_set(name, root)


# ------------------------------------------------------------------------------------------------
# Embedded data
# ------------------------------------------------------------------------------------------------

def _check_normalisation(name: str, images: np.ndarray) -> None:
    info = get_info(name)
    levels = np.arange(256) / 255.0
    for c in range(3):  # exact moments from the histogram of each channel
        p = np.bincount(images[..., c].ravel(), minlength=256) / images[..., c].size
        mean = p @ levels
        assert abs(mean - info.mean[c]) < 1e-3
        assert abs(np.sqrt(p @ (levels - mean) ** 2) - info.std[c]) < 1e-3


def test_digits_offline_split():
    train_x, train_y = load_arrays("digits", None, train=True)
    test_x, test_y = load_arrays("digits", None, train=False)
    assert train_x.shape == (DIGITS_SIZES["train"], 32, 32, 3) == (1442, 32, 32, 3)
    assert test_x.shape == (DIGITS_SIZES["test"], 32, 32, 3) == (355, 32, 32, 3)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert set(train_y) == set(test_y) == set(range(10)) and get_info("digits").num_classes == 10
    # stratified: every class has about 20 % of its images in test
    share = np.bincount(test_y) / (np.bincount(test_y) + np.bincount(train_y))
    assert np.all(np.abs(share - 0.2) < 0.01)
    assert np.array_equal(train_x[..., 0], train_x[..., 2]) and train_x.max() > 200
    again, _ = load_arrays("digits", None, train=True)
    assert np.array_equal(again, train_x)
    _check_normalisation("digits", train_x)


@pytest.mark.slow
@pytest.mark.parametrize("name, num_classes", [("synthetic10", 10), ("synthetic100", 100)])
def test_synthetic_shapes_determinism_balance(name, num_classes):
    train_x, train_y = load_arrays(name, None, train=True)
    test_x, test_y = load_arrays(name, None, train=False)
    assert train_x.shape == (50_000, 32, 32, 3) and test_x.shape == (10_000, 32, 32, 3)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert np.all(np.bincount(train_y) == 50_000 // num_classes)
    assert np.all(np.bincount(test_y) == 10_000 // num_classes)
    from okdph.data.synthetic import _generate, make_synthetic
    _generate.cache_clear()
    again_x, again_y = make_synthetic(num_classes, train=False)
    assert np.array_equal(again_x, test_x) and np.array_equal(again_y, test_y)
    other_x, _ = make_synthetic(num_classes, train=False, seed=1)
    assert not np.array_equal(other_x, test_x)
    train_x[0] = 0  # callers own a copy: the cache is untouched
    assert not np.array_equal(load_arrays(name, None, train=True)[0][0], train_x[0])
    _check_normalisation(name, load_arrays(name, None, train=True)[0])


def test_synthetic10_learnable_not_trivial():
    train_x, train_y = load_arrays("synthetic10", None, train=True)
    test_x, test_y = load_arrays("synthetic10", None, train=False)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
    xtr, xte = flat(train_x[:20_000]), flat(test_x[:5_000])
    means = np.stack([xtr[train_y[:20_000] == c].mean(0) for c in range(10)])
    pred = (xte @ means.T - 0.5 * (means ** 2).sum(1)).argmax(1)
    accuracy = (pred == test_y[:5_000]).mean()
    assert 0.3 < accuracy < 0.9, accuracy  # chance is 0.1; measured 0.54 (logistic regression: ~0.75)


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------

def _pil(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_gives_a_normalised_tensor(view):
    torch.manual_seed(0)
    for name in ("cifar10", "cifar100", "digits"):
        x = build_train_transform(view, get_info(name))(_pil())
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    x = build_train_transform(view, get_info("imagenet"))(_pil((300, 260)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32


def test_digits_views_never_flip_on_either_pipeline():
    # A mirrored digit is another shape (a 2, a 7) or no digit: every view of a dataset that is not
    # mirror-invariant skips its flip, the others keep theirs; the GPU pipeline does the same.
    from okdph.data.gpu_augment import augment

    digits, cifar = get_info("digits"), get_info("cifar10")
    assert not digits.mirror_invariant and cifar.mirror_invariant
    for view in VIEWS:
        ops = build_train_transform(view, digits).transforms
        assert not any(isinstance(t, T.RandomHorizontalFlip) for t in ops), view
    for view in ("hflip", "hflip+rot", "cutout"):
        assert any(isinstance(t, T.RandomHorizontalFlip) for t in build_train_transform(view, cifar).transforms)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    for view in ("hflip", "cutout"):
        mirrored = {}
        for name, info in (("digits", digits), ("cifar10", cifar)):
            ours = augment(images, view, info, torch.Generator().manual_seed(0))
            same_draws = augment(images, view, replace(info, mirror_invariant=False), torch.Generator().manual_seed(0))
            mirrored[name] = not torch.equal(ours, same_draws)
        assert mirrored == {"digits": False, "cifar10": True}, view


def test_compositions_match_methods_11_2():
    info = get_info("cifar100")
    ops = {v: build_train_transform(v, info).transforms for v in VIEWS}
    for view in ("hflip", "hflip+rot", "cutout", "augment", "auto_aug"):
        crop = ops[view][0]
        assert isinstance(crop, T.RandomCrop) and crop.size == (32, 32) and crop.padding == 4 and crop.fill == 0
        assert isinstance(ops[view][-2], (T.ToTensor, Cutout)) and isinstance(ops[view][-1], T.Normalize)
        assert ops[view][-1].mean == info.mean and ops[view][-1].std == info.std
    rot = ops["hflip+rot"][2]
    assert isinstance(ops["hflip+rot"][1], T.RandomHorizontalFlip) and isinstance(rot, T.RandomRotation)
    assert rot.degrees == [-15.0, 15.0] and rot.interpolation == T.InterpolationMode.NEAREST and rot.fill == 0
    (rand,) = [t for t in ops["augment"] if isinstance(t, T.RandAugment)]
    assert (rand.num_ops, rand.magnitude, rand.num_magnitude_bins) == (2, 9, 31)
    assert rand.interpolation == T.InterpolationMode.NEAREST
    (auto,) = [t for t in ops["auto_aug"] if isinstance(t, T.AutoAugment)]
    assert auto.policy == T.AutoAugmentPolicy.IMAGENET
    for view in ("augment", "auto_aug"):
        assert not any(isinstance(t, T.RandomHorizontalFlip) for t in ops[view])
    types = [type(t) for t in ops["cutout"]]
    assert types == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, Cutout, T.Normalize]
    assert ops["cutout"][3].length == 16 and ops["cutout"][3].n_holes == 1
    assert [type(t) for t in ops["base"]] == [T.ToTensor, T.Normalize]
    assert [type(t) for t in build_test_transform(info).transforms] == [T.ToTensor, T.Normalize]
    imagenet = get_info("imagenet")
    cut = build_train_transform("cutout", imagenet).transforms
    assert isinstance(cut[0], T.RandomResizedCrop) and cut[0].size == (224, 224) and cut[3].length == 32
    assert [type(t) for t in build_test_transform(imagenet).transforms] == [T.Resize, T.CenterCrop, T.ToTensor,
                                                                           T.Normalize]


def test_cutout_hole_geometry():
    cutout = Cutout(1, 16)
    for seed in range(200):
        torch.manual_seed(seed)
        y, x = int(torch.randint(32, ())), int(torch.randint(32, ()))
        torch.manual_seed(seed)
        out = cutout(torch.ones(3, 32, 32))
        expected = torch.ones(32, 32)
        expected[max(y - 8, 0):min(y + 8, 32), max(x - 8, 0):min(x + 8, 32)] = 0
        assert torch.equal(out, expected.expand(3, 32, 32))
        if 8 <= y <= 24 and 8 <= x <= 24:
            assert (out[0] == 0).sum() == 256


def test_cutout_hole_reads_minus_mean_over_std():
    info = get_info("cifar10")
    ops = build_train_transform("cutout", info).transforms
    after_crop_and_flip = T.Compose(ops[2:])  # ToTensor -> Cutout -> Normalize
    white = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))
    torch.manual_seed(3)
    x = after_crop_and_flip(white)
    hole = -torch.tensor(info.mean) / torch.tensor(info.std)
    white_value = (1 - torch.tensor(info.mean)) / torch.tensor(info.std)
    is_hole = torch.isclose(x, hole.view(3, 1, 1))
    assert torch.equal(is_hole[0], is_hole[1]) and torch.equal(is_hole[0], is_hole[2])
    assert 64 <= is_hole[0].sum() <= 256
    assert torch.allclose(x[~is_hole], white_value.view(3, 1, 1).expand(3, 32, 32)[~is_hole])


# ------------------------------------------------------------------------------------------------
# Datasets: views, settings
# ------------------------------------------------------------------------------------------------

def test_multi_view_items():
    torch.manual_seed(0)
    ds = build_train_set("digits", None, ["hflip", "hflip", "cutout", "augment"])
    x, y = ds[5]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y == int(ds.targets[5])
    assert not torch.equal(x[0], x[2]) and not torch.equal(x[2], x[3])
    assert any(not torch.equal(ds[i][0][0], ds[i][0][1]) for i in range(10))  # same type, own draws
    assert ds.images.shape == (1442, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.targets.dtype == np.int64
    assert build_train_set("digits", None, "hflip")[0][0].shape == (1, 3, 32, 32)
    x, y = build_test_set("digits", None)[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)


def test_noisy_setting_redraws_every_access():
    clean = build_test_set("digits", None)
    for ds in (build_train_set("digits", None, ["base", "base"], setting="noisy"),
               build_test_set("digits", None, setting="noisy")):
        a, b = ds[7][0], ds[7][0]
        assert not torch.equal(a, b)
        assert ds.images is not None and len(ds.targets) == len(ds)
    noisy = build_test_set("digits", None, setting="noisy")
    noise = torch.stack([noisy[i][0] - clean[i][0] for i in range(20)])
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    views = build_train_set("digits", None, ["base", "base"], setting="noisy")[0][0]
    assert not torch.equal(views[0], views[1])  # each view gets its own noise
    half = build_test_set("digits", None, setting="noisy", noise_mean=2.0, noise_std=0.5)
    noise = torch.stack([half[i][0] - clean[i][0] for i in range(20)])
    assert abs(noise.mean() - 2) < 0.05 and abs(noise.std() - 0.5) < 0.05


def _reference_limited(targets, percent):
    """The official notebook's sampler, written plainly (global numpy RNG, restored afterwards)."""
    state = np.random.get_state()
    try:
        np.random.seed(42)
        by_label = {}
        for i, label in enumerate(targets.tolist()):
            by_label.setdefault(label, []).append(i)
        out = []
        for inds in by_label.values():
            out.extend(np.random.choice(inds, int(round(len(inds) * percent / 100, 0))))
        return np.array(out)
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("num_classes, percent, size, per_class", [
    (10, 10, 5000, 500), (10, 1, 500, 50), (100, 10, 5000, 50), (100, 1, 500, 5)])
def test_limited_indices(num_classes, percent, size, per_class):
    targets = np.random.default_rng(num_classes).permutation(np.repeat(np.arange(num_classes), 50_000 // num_classes))
    before = np.random.get_state()[1].copy()
    idx = limited_indices(targets, percent)
    assert np.array_equal(np.random.get_state()[1], before)  # no global side effect
    assert idx.dtype == np.int64 and len(idx) == size
    assert np.all(np.bincount(targets[idx], minlength=num_classes) == per_class)
    assert len(np.unique(idx)) < len(idx)  # drawn with replacement, duplicates kept
    assert np.array_equal(idx, limited_indices(targets, percent))
    assert np.array_equal(idx, _reference_limited(targets, percent))
    # class blocks follow the order of first appearance
    _, first = np.unique(targets, return_index=True)
    assert targets[idx[0]] == targets[np.min(first)]


def test_limited_setting_subsets_train_only():
    _, targets = load_arrays("digits", None, train=True)
    expected = sum(round(n * 10 / 100) for n in np.bincount(targets))
    ds = build_train_set("digits", None, ["hflip"], setting="limited10")
    assert len(ds) == len(ds.images) == expected
    assert np.array_equal(ds.targets, targets[limited_indices(targets, 10)])
    assert len(build_train_set("digits", None, ["hflip"], setting="limited1")) == \
        sum(round(n / 100) for n in np.bincount(targets))
    assert len(build_test_set("digits", None, setting="limited10")) == 355
    assert len(build_train_set("synthetic100", None, ["hflip"], setting="limited1")) == 500


# ------------------------------------------------------------------------------------------------
# ImageNet folder
# ------------------------------------------------------------------------------------------------

def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for k, cls in enumerate(("n01", "n02")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                _pil((64 + 8 * i, 48), seed=10 * k + i).save(tmp_path / split / cls / f"{i}.png")
    torch.manual_seed(0)
    ds = build_train_set("imagenet", tmp_path, ["hflip", "cutout", "augment"])
    x, y = ds[4]
    assert len(ds) == 6 and x.shape == (3, 3, 224, 224) and y == 1
    x, y = build_test_set("imagenet", tmp_path)[0]
    assert x.shape == (3, 224, 224) and y == 0
    assert build_train_set("imagenet", tmp_path, ["hflip"], setting="noisy")[0][0].shape == (1, 3, 224, 224)
    with pytest.raises(DataError) as err:
        build_test_set("imagenet", tmp_path / "nowhere")
    assert "--data-root" in _one_line(err)
    (tmp_path / "bare" / "val").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        build_test_set("imagenet", tmp_path / "bare")
    _one_line(err)


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------

def test_infos():
    assert DATASETS == ("cifar10", "cifar100", "digits", "synthetic10", "synthetic100", "imagenet")
    assert get_info("cifar10").std == (0.2023, 0.1994, 0.2010)
    np.testing.assert_allclose(get_info("cifar100").mean, (0.50708, 0.48655, 0.44092), atol=1e-5)
    np.testing.assert_allclose(get_info("cifar100").std, (0.26733, 0.25644, 0.27615), atol=1e-5)
    assert get_info("imagenet").image_size == 224 and get_info("imagenet").num_classes == 1000
    assert {n: get_info(n).default_view for n in DATASETS} == {
        "cifar10": "hflip", "cifar100": "hflip+rot", "digits": "hflip", "synthetic10": "hflip",
        "synthetic100": "hflip+rot", "imagenet": "hflip"}


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(DataError) as err:
        get_info("cifar1000")
    assert all(n in _one_line(err) for n in DATASETS)
    with pytest.raises(DataError) as err:
        build_train_transform("flip", get_info("cifar10"))
    assert all(v in _one_line(err) for v in VIEWS)
    with pytest.raises(DataError) as err:
        build_train_set("digits", None, ["hflip", "rot"])
    assert "hflip+rot" in _one_line(err)
    with pytest.raises(DataError) as err:
        build_test_set("digits", None, setting="limited5")
    assert all(s in _one_line(err) for s in SETTINGS)
    with pytest.raises(DataError) as err:
        load_arrays("imagenet", "/nowhere", train=True)
    _one_line(err)
