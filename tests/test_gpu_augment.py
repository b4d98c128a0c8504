"""Device-side per-sample augmentation (okdph/data/gpu_augment.py) against torchvision.

Exactness: every op, given the same parameters, equals torchvision's v2 functional tensor kernels
image by image, bit for bit (and crop / flip / Cutout / normalisation equal the PIL pipeline of
okdph/data/transforms.py). Statistics: the per-sample draws follow torchvision's samplers.
Runs on CPU; the exactness tests also run on CUDA when one is present.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F

from okdph.data import gpu_augment as G
from okdph.data.info import get_info
from okdph.data.transforms import VIEWS as CPU_VIEWS
from okdph.data.transforms import build_test_transform

INFO = get_info("cifar100")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NEAREST = InterpolationMode.NEAREST

_RA = T.RandAugment()
_RA_SPACE = _RA._augmentation_space(31, (32, 32))
_AA = T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)
_AA_SPACE = _AA._augmentation_space(10, (32, 32))
_V2_AA = v2.AutoAugment()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Hundreds of tiny per-image reference calls: with 2 threads on a shared 2-core machine each one
    waits for a busy core (~40x slower); one thread keeps the module well under a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Random uint8 images plus special cases: constant (AutoContrast/Equalize degenerate), two-level,
    low-contrast, gradient, saturated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    specials = [
        torch.full((3, 32, 32), 77, dtype=torch.uint8),
        torch.cat([torch.full((3, 32, 16), 10), torch.full((3, 32, 16), 200)], dim=2).to(torch.uint8),
        torch.randint(100, 110, (3, 32, 32), generator=g).to(torch.uint8),
        torch.arange(32 * 32 * 3).view(3, 32, 32).remainder(256).to(torch.uint8),
        torch.full((3, 32, 32), 255, dtype=torch.uint8),
        torch.full((3, 32, 32), 170, dtype=torch.uint8),
    ]
    for i, s in enumerate(specials[: n // 2]):
        x[i] = s
    return x.to(device)


def _ref_op(img: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """torchvision v2's own AutoAugment op dispatcher. Solarize: v1 magnitudes are thresholds in pixel
    units (v2's dispatcher multiplies a 0..1 magnitude by 255), so call the v2 kernel directly."""
    if op == "Solarize":
        return F.solarize(img, magnitude)
    return _V2_AA._apply_image_or_video_transform(img, op, magnitude, interpolation=NEAREST, fill=_V2_AA._fill)


def _assert_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    diff = (a != b)
    assert not diff.any(), f"{what}: {int(diff.sum())} elements differ"


def _ra_magnitude(op: str, negate: bool) -> float:
    m, signed = _RA_SPACE[op]
    m = float(m[9].item()) if m.ndim > 0 else 0.0
    return -m if (signed and negate) else m


def _aa_magnitude(op: str, magnitude_id, negate: bool) -> float:
    m, signed = _AA_SPACE[op]
    m = float(m[magnitude_id].item()) if magnitude_id is not None else 0.0
    return -m if (signed and negate) else m


def _reference_view(images: torch.Tensor, view: str, p: dict) -> torch.Tensor:
    """The view image by image with torchvision v2 functional ops on tensors and the given parameters."""
    mean = torch.tensor(INFO.mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(INFO.std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    out = []
    for i in range(images.shape[0]):
        img = images[i]
        if view != "base":
            img = F.crop(F.pad(img, [4], fill=0), int(p["top"][i]), int(p["left"][i]), 32, 32)
            if "flip" in p and bool(p["flip"][i]):
                img = F.horizontal_flip(img)
        if view == "hflip+rot":
            img = F.rotate(img, float(p["angle"][i]), interpolation=NEAREST, fill=0)
        elif view == "augment":
            for r in range(2):
                op = G.RANDAUGMENT_OPS[int(p["ops"][i, r])]
                img = _ref_op(img, op, _ra_magnitude(op, bool(p["negate"][i, r])))
        elif view == "auto_aug":
            for k, (op, _, magnitude_id) in enumerate(_AA.policies[int(p["policy"][i])]):
                if bool(p["apply"][i, k]):
                    img = _ref_op(img, op, _aa_magnitude(op, magnitude_id, bool(p["negate"][i, k])))
        x = img.float().div(255)                             # ToTensor
        if view == "cutout":
            y, xx = int(p["cy"][i]), int(p["cx"][i])
            x = x.clone()
            x[:, max(y - 8, 0):min(y + 8, 32), max(xx - 8, 0):min(xx + 8, 32)] = 0.0
        out.append(x.sub(mean).div(std))                     # Normalize
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# torchvision's definitions
# ------------------------------------------------------------------------------------------------

def test_views_and_op_tables_match_torchvision():
    assert G.VIEWS == CPU_VIEWS
    assert G.RANDAUGMENT_OPS == tuple(_RA_SPACE)
    assert len(G.RANDAUGMENT_OPS) == 14 and _RA.num_ops == 2 and _RA.magnitude == 9
    assert G.AUTOAUGMENT_POLICY == tuple(tuple(tuple(o) for o in s) for s in _AA.policies)
    assert len(G.AUTOAUGMENT_POLICY) == 25
    # a few magnitudes pinned by value (RandAugment bin 9 of 31, AutoAugment bins of 10)
    expected = {"ShearX": 0.09, "TranslateX": 150 / 331 * 32 * 9 / 30, "Rotate": 9.0, "Brightness": 0.27,
                "Posterize": 7.0, "Solarize": 178.5, "Identity": 0.0, "Equalize": 0.0}
    for op, value in expected.items():
        m, _ = G.randaugment_magnitude(op)
        assert m == pytest.approx(value, rel=1e-6)
    signed = {op for op in G.RANDAUGMENT_OPS if G.randaugment_magnitude(op)[1]}
    assert signed == {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                      "Contrast", "Sharpness"}
    assert G.autoaugment_magnitude("Solarize", 3) == (170.0, False)   # v1 threshold, exactly 170
    assert G.autoaugment_magnitude("Rotate", 8)[0] == pytest.approx(80 / 3, rel=1e-6)
    assert G.autoaugment_magnitude("Posterize", 8) == (4.0, False)


# ------------------------------------------------------------------------------------------------
# Exactness, op by op, different parameters per sample in one batch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_random_crop_and_flip_match_torchvision(device):
    n = 40
    x = _images(n, device)
    g = torch.Generator().manual_seed(1)
    top = torch.randint(0, 9, (n,), generator=g)
    left = torch.randint(0, 9, (n,), generator=g)
    top[:4], left[:4] = torch.tensor([0, 8, 0, 8]), torch.tensor([0, 8, 8, 0])
    flip = torch.rand(n, generator=g) < 0.5
    crop = G.random_crop(x, top.to(device), left.to(device))
    both = G.crop_flip(x, top.to(device), left.to(device), flip.to(device))
    flipped = G.hflip_where(x, flip.to(device))
    for i in range(n):
        ref = F.crop(F.pad(x[i], [4], fill=0), int(top[i]), int(left[i]), 32, 32)
        _assert_equal(crop[i], ref, f"crop {i}")
        _assert_equal(both[i], F.horizontal_flip(ref) if flip[i] else ref, f"crop+flip {i}")
        _assert_equal(flipped[i], F.horizontal_flip(x[i]) if flip[i] else x[i], f"flip {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_rotate_nearest_matches_torchvision(device):
    special = [-15.0, 15.0, 0.0, -0.0, 1e-4, -1e-4, 7.3, -9.0, 14.999, 45.0, 90.0, -90.0, 180.0, 270.0,
               359.9, 723.0, -180.0, 30.0, -26.666666]
    g = torch.Generator().manual_seed(2)
    angles = torch.cat([torch.tensor(special), torch.empty(45).uniform_(-15, 15, generator=g)])
    n = angles.numel()
    x = _images(n, device)
    out = G.rotate_nearest(x, angles.to(device))
    for i in range(n):
        a = float(angles[i])
        _assert_equal(out[i], F.rotate(x[i], a, interpolation=NEAREST, fill=0), f"angle {a}")
        _assert_equal(out[i], F.rotate(x[i], a, interpolation=NEAREST), f"angle {a}, fill None")


def _op_magnitudes() -> dict[str, list[float]]:
    """Every op of RandAugment and AutoAugment(IMAGENET) at several bins of both spaces, both signs."""
    out: dict[str, list[float]] = {}
    for op, (mags, signed) in _RA_SPACE.items():
        values = [float(mags[b].item()) for b in (0, 3, 9, 17, 30)] if mags.ndim > 0 else [0.0]
        out[op] = values + ([-v for v in values] if signed else [])
    for sub in _AA.policies:
        for op, _, magnitude_id in sub:
            for negate in (False, True):
                out.setdefault(op, []).append(_aa_magnitude(op, magnitude_id, negate))
    return {op: sorted(set(v)) for op, v in out.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(_op_magnitudes()))
def test_ops_match_torchvision_per_sample(device, op):
    n = 16
    x = _images(n, device, seed=3)
    g = torch.Generator().manual_seed(4)
    for m in _op_magnitudes()[op]:
        mask = torch.rand(n, generator=g) < 0.6
        mask[:6] = True                                  # the special images always get the op
        out = G.apply_op_where(x, op, m, mask.to(device))
        whole = G.apply_op(x, op, m)
        for i in range(n):
            ref = _ref_op(x[i], op, m)
            _assert_equal(whole[i], ref, f"{op}({m}) image {i}")
            _assert_equal(out[i], ref if mask[i] else x[i], f"{op}({m}) where, image {i}")
            _assert_equal(G.torchvision_op(x[i], op, m), ref, f"torchvision_op {op}({m})")


@pytest.mark.parametrize("device", DEVICES)
def test_randaugment_matches_torchvision_per_sample(device):
    k = len(G.RANDAUGMENT_OPS)
    n = 2 * k + 36
    g = torch.Generator().manual_seed(5)
    ops = torch.randint(0, k, (n, 2), generator=g)
    negate = torch.randint(0, 2, (n, 2), generator=g) == 1
    ops[: 2 * k, 0] = torch.arange(k).repeat(2)          # every op with both signs in round 1 ...
    negate[: 2 * k, 0] = torch.arange(2 * k) >= k
    ops[: 2 * k, 1] = torch.arange(k).repeat_interleave(2)   # ... and in round 2
    negate[: 2 * k, 1] = torch.arange(2 * k) % 2 == 1
    x = _images(n, device, seed=6)
    out = G.randaugment(x, ops.to(device), negate.to(device))
    for i in range(n):
        img = x[i]
        for r in range(2):
            op = G.RANDAUGMENT_OPS[int(ops[i, r])]
            img = _ref_op(img, op, _ra_magnitude(op, bool(negate[i, r])))
        _assert_equal(out[i], img, f"sample {i}: {ops[i].tolist()} {negate[i].tolist()}")


@pytest.mark.parametrize("device", DEVICES)
def test_autoaugment_matches_torchvision_per_sample(device):
    n_pol = len(_AA.policies)
    policy = torch.arange(n_pol).repeat(4)
    apply = torch.tensor([[a, b] for a in (False, True) for b in (False, True)]).repeat_interleave(n_pol, 0)
    negate = torch.randint(0, 2, (4 * n_pol, 2), generator=torch.Generator().manual_seed(7)) == 0
    x = _images(4 * n_pol, device, seed=8)
    out = G.autoaugment(x, policy.to(device), apply.to(device), negate.to(device))
    for i in range(4 * n_pol):
        img = x[i]
        for k, (op, _, magnitude_id) in enumerate(_AA.policies[int(policy[i])]):
            if apply[i, k]:
                img = _ref_op(img, op, _aa_magnitude(op, magnitude_id, bool(negate[i, k])))
        _assert_equal(out[i], img, f"sample {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", G.VIEWS)
def test_views_match_torchvision_per_sample(device, view):
    n = 48
    x = _images(n, device, seed=9)
    gen = torch.Generator(device=device).manual_seed(10)
    p = G.sample_params(view, n, generator=gen, device=device)
    out = G.apply_view(x, view, INFO, p)
    assert out.dtype == torch.float32 and out.shape == (n, 3, 32, 32) and out.device == x.device
    _assert_equal(out, _reference_view(x, view, {k: v.cpu() for k, v in p.items()}), view)


@pytest.mark.parametrize("view", ["base", "hflip", "cutout"])
def test_crop_flip_cutout_views_match_the_pil_pipeline(view):
    """Crop, flip, Cutout and ToTensor/Normalize are exact against okdph/data/transforms.py (PIL)."""
    n = 24
    x = _images(n)
    p = G.sample_params(view, n, generator=torch.Generator().manual_seed(11))
    out = G.apply_view(x, view, INFO, p)
    normalize = T.Normalize(INFO.mean, INFO.std)
    for i in range(n):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        if view == "base":
            _assert_equal(out[i], build_test_transform(INFO)(pil), "base")
            continue
        pil = TF.crop(TF.pad(pil, 4, fill=0), int(p["top"][i]), int(p["left"][i]), 32, 32)
        if p["flip"][i]:
            pil = TF.hflip(pil)
        t = T.ToTensor()(pil)
        if view == "cutout":
            y, xx = int(p["cy"][i]), int(p["cx"][i])
            t[:, max(y - 8, 0):min(y + 8, 32), max(xx - 8, 0):min(xx + 8, 32)] = 0.0
        _assert_equal(out[i], normalize(t), f"{view} {i}")


def test_cutout_region_reads_minus_mean_over_std():
    n = 64
    x = _images(n)
    p = G.sample_params("cutout", n, generator=torch.Generator().manual_seed(12))
    p["cy"][:4], p["cx"][:4] = torch.tensor([0, 31, 5, 20]), torch.tensor([0, 31, 27, 8])
    out = G.apply_view(x, "cutout", INFO, p)
    plain = G.apply_view(x, "hflip", INFO, {k: p[k] for k in ("top", "left", "flip")})
    fill = (0.0 - torch.tensor(INFO.mean, dtype=torch.float32)) / torch.tensor(INFO.std, dtype=torch.float32)
    ys, xs = torch.arange(32).view(32, 1), torch.arange(32).view(1, 32)
    for i in range(n):
        y, xx = int(p["cy"][i]), int(p["cx"][i])
        hole = (ys >= y - 8) & (ys < y + 8) & (xs >= xx - 8) & (xs < xx + 8)
        assert int(hole.sum()) == (min(y + 8, 32) - max(y - 8, 0)) * (min(xx + 8, 32) - max(xx - 8, 0))
        for c in range(3):
            assert (out[i, c][hole] == fill[c]).all()
            assert torch.equal(out[i, c][~hole], plain[i, c][~hole])
    # the float building block zeroes exactly the clipped square
    z = G.cutout(torch.ones(2, 3, 32, 32), torch.tensor([0, 16]), torch.tensor([31, 16]), 16)
    assert int((z[0, 0] == 0).sum()) == 8 * 9 and int((z[1, 0] == 0).sum()) == 256


# ------------------------------------------------------------------------------------------------
# Statistics of the per-sample draws (torchvision's samplers)
# ------------------------------------------------------------------------------------------------

def _chi2_threshold(df: int, z: float = 5.0) -> float:
    """Wilson-Hilferty upper quantile of chi2(df) at a normal z (5 sigma: p ~ 3e-7)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _assert_uniform(values: torch.Tensor, k: int, what: str) -> None:
    values = values.reshape(-1).long()
    assert int(values.min()) >= 0 and int(values.max()) <= k - 1, what
    counts = torch.bincount(values, minlength=k).double()
    expected = values.numel() / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_threshold(k - 1), f"{what}: chi2 {chi2:.1f} with {k - 1} dof"
    assert int(counts.min()) > 0, what


def _assert_rate(flags: torch.Tensor, p: float, what: str) -> None:
    n = flags.numel()
    rate = float(flags.double().mean())
    sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(rate - p) <= 5 * sigma + 1e-12, f"{what}: rate {rate:.4f}, expected {p}"


N_STAT = 100_000


def test_crop_flip_rotation_cutout_draws_are_uniform():
    gen = torch.Generator().manual_seed(13)
    p = G.sample_params("hflip+rot", N_STAT, generator=gen)
    _assert_uniform(p["top"], 9, "crop top")
    _assert_uniform(p["left"], 9, "crop left")
    _assert_uniform(p["top"] * 9 + p["left"], 81, "crop (top, left) jointly")
    _assert_rate(p["flip"], 0.5, "flip")
    a = p["angle"]
    assert a.dtype == torch.float32 and float(a.min()) >= -15.0 and float(a.max()) <= 15.0
    _assert_uniform(((a + 15.0) / 1.0).floor().clamp(0, 29), 30, "rotation angle, 1 degree bins")
    c = G.sample_params("cutout", N_STAT, generator=gen)
    _assert_uniform(c["cy"], 32, "cutout cy")
    _assert_uniform(c["cx"], 32, "cutout cx")
    _assert_rate(c["flip"], 0.5, "cutout flip")


def test_randaugment_draws_follow_torchvision():
    p = G.sample_params("augment", N_STAT, generator=torch.Generator().manual_seed(14))
    k = len(G.RANDAUGMENT_OPS)
    assert p["ops"].shape == (N_STAT, 2) and "flip" not in p
    for r in range(2):
        _assert_uniform(p["ops"][:, r], k, f"RandAugment op, round {r}")
        _assert_rate(p["negate"][:, r], 0.5, f"RandAugment sign, round {r}")
    _assert_uniform(p["ops"][:, 0] * k + p["ops"][:, 1], k * k, "RandAugment op pair")
    for op_index in range(k):           # the sign is a fair coin for each op
        sel = p["ops"][:, 0] == op_index
        _assert_rate(p["negate"][sel, 0], 0.5, f"sign of {G.RANDAUGMENT_OPS[op_index]}")


def test_autoaugment_draws_follow_torchvision():
    p = G.sample_params("auto_aug", N_STAT, generator=torch.Generator().manual_seed(15))
    assert "flip" not in p
    _assert_uniform(p["policy"], 25, "AutoAugment sub-policy")
    for step in range(2):
        _assert_rate(p["negate"][:, step], 0.5, f"AutoAugment sign, op {step}")
        by_prob: dict[float, list[torch.Tensor]] = {}
        for j, sub in enumerate(_AA.policies):
            by_prob.setdefault(sub[step][1], []).append(p["apply"][p["policy"] == j, step])
        for prob, flags in by_prob.items():
            flags = torch.cat(flags)
            if prob in (0.0, 1.0):
                assert bool((flags == (prob == 1.0)).all()), f"probability {prob}"
            else:
                _assert_rate(flags, prob, f"AutoAugment op {step} with probability {prob}")


def test_augment_draws_from_the_generator_then_applies_the_view():
    x = _images(40)
    for view in G.VIEWS:
        out = G.augment(x, view, INFO, torch.Generator().manual_seed(16))
        p = G.sample_params(view, 40, generator=torch.Generator().manual_seed(16))
        _assert_equal(out, G.apply_view(x, view, INFO, p), view)


def test_per_sample_choices_differ_within_a_batch():
    """The views really draw per sample: one image repeated gets many different outputs."""
    x = _images(8)[6:7].repeat(256, 1, 1, 1)
    for view in ("hflip", "hflip+rot", "cutout", "augment", "auto_aug"):
        out = G.augment(x, view, INFO, torch.Generator().manual_seed(17))
        distinct = torch.unique(out.flatten(1), dim=0).shape[0]
        assert distinct > 100, (view, distinct)


# ------------------------------------------------------------------------------------------------
# API: shapes, dtype, determinism, chunking, errors
# ------------------------------------------------------------------------------------------------

def test_output_dtype_shape_and_normalisation():
    x = _images(20)
    for view in G.VIEWS:
        out = G.augment(x, view, INFO, torch.Generator().manual_seed(18))
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert torch.isfinite(out).all()
        lo = (0 - torch.tensor(INFO.mean)) / torch.tensor(INFO.std)
        hi = (1 - torch.tensor(INFO.mean)) / torch.tensor(INFO.std)
        assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()
    base = G.augment(x, "base", INFO)
    _assert_equal(base, (x.float() / 255 - torch.tensor(INFO.mean).view(1, 3, 1, 1))
                  / torch.tensor(INFO.std).view(1, 3, 1, 1), "base")


def test_deterministic_given_a_seeded_generator_and_independent_of_chunking():
    x = _images(50)
    for view in G.VIEWS:
        a = G.augment(x, view, INFO, torch.Generator().manual_seed(19))
        b = G.augment(x, view, INFO, torch.Generator().manual_seed(19))
        _assert_equal(a, b, view)
        if view != "base":
            c = G.augment(x, view, INFO, torch.Generator().manual_seed(20))
            assert not torch.equal(a, c), view
        p = G.sample_params(view, 50, generator=torch.Generator().manual_seed(19))
        _assert_equal(G.apply_view(x, view, INFO, p, chunk=7), a, f"{view} in chunks of 7")


def test_default_generator_and_empty_batch():
    x = _images(10)
    torch.manual_seed(0)
    a = G.augment(x, "augment", INFO)
    torch.manual_seed(0)
    _assert_equal(G.augment(x, "augment", INFO), a, "default generator")
    empty = G.augment(x[:0], "auto_aug", INFO)
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == torch.float32


def test_errors():
    x = _images(4)
    with pytest.raises(ValueError) as err:
        G.augment(x, "flip", INFO)
    for view in G.VIEWS:
        assert repr(view) in str(err.value) or view in str(err.value)
    with pytest.raises(NotImplementedError, match="32x32"):
        G.augment(torch.zeros(2, 3, 224, 224, dtype=torch.uint8), "hflip", get_info("imagenet"))
    with pytest.raises(ValueError, match="uint8"):
        G.augment(x.float(), "hflip", INFO)
    with pytest.raises(ValueError, match="uint8"):
        G.augment(x[:, :, :16], "hflip", INFO)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_and_device():
    x = _images(64, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(21)
    out = G.augment(x, "augment", INFO, gen)
    assert out.device == x.device
    with pytest.raises(ValueError, match="generator"):
        G.augment(x, "augment", INFO, torch.Generator())
