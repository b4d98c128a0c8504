"""Per-sample augmentation of uint8 image batches on their own device (the fast engine,
docs/architecture.md#engine-layer).

The six training views of docs/methods.md#training-views for CIFAR-sized (32x32) data, every sample with its own
random parameters, no Python loop over samples, static shapes, no host synchronisation per chunk:

| view        | ops (uint8)                                    | float                       |
|-------------|------------------------------------------------|-----------------------------|
| 'hflip'     | RandomCrop(32, padding 4), HorizontalFlip(0.5) | ToTensor, Normalize         |
| 'hflip+rot' | crop, flip, RandomRotation(15) nearest, fill 0 | ToTensor, Normalize         |
| 'cutout'    | crop, flip                                     | ToTensor, Cutout(16), Normalize |
| 'augment'   | crop, RandAugment() (2 ops, magnitude 9/31)    | ToTensor, Normalize         |
| 'auto_aug'  | crop, AutoAugment(IMAGENET policy)             | ToTensor, Normalize         |
| 'base'      | none                                           | ToTensor, Normalize         |

Exactness. Given the same parameters, every op gives bit for bit what torchvision's v2 functional
tensor kernel gives image by image (tests/test_gpu_augment.py checks each one):
- crop / flip / Cutout are integer gathers and masks;
- RandomRotation uses torchvision's own grid arithmetic (``rotate_image``: angle % 360, the inverse
  affine matrix, ``_affine_grid``) with one matrix per sample, then ``grid_sample`` (nearest);
- RandAugment / AutoAugment compute every (op, signed magnitude) variant on the whole chunk, each with
  ONE fixed parameter, and pick per sample with ``torch.where`` (a v2 kernel applied to a batch with
  one parameter is, image for image, the kernel applied to each image). The geometric variants
  (shear, translate, rotate; nearest, fill 0) are pure pixel copies, so each is turned once into a
  source-index map by running the v2 kernel itself on an image of pixel indices; all of them then
  cost one gather per RandAugment round. Sharpness and AutoContrast are re-stated line by line from
  the v2 kernels only to avoid their host syncs (a boolean-mask assignment, a host->device kernel
  copy); the other colour ops call the v2 kernels.
The op set, magnitude bins, signs and probabilities come from torchvision's v1 RandAugment /
AutoAugment (what okdph/data/transforms.py uses): in particular Solarize thresholds are v1's
``linspace(255, 0, bins)`` (AutoAugment bin 3 is exactly 170.0, as with PIL; v2 would use 170.00001).
The CPU pipeline works on PIL images; torchvision's PIL and tensor kernels agree exactly for crop, flip
and Cutout, and only approximately for rotation, affine and colour ops (rounding, pixel centres).
Random draws follow torchvision's samplers in distribution (not its RNG stream).

Work is done in chunks of ``CHUNK`` images (parameters are drawn for the whole batch first, so the
result does not depend on the chunk size).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as nnF
from torch import Tensor
from torchvision.transforms import AutoAugment as _V1AutoAugment
from torchvision.transforms import AutoAugmentPolicy, InterpolationMode
from torchvision.transforms import RandAugment as _V1RandAugment
from torchvision.transforms.v2 import functional as F

from okdph.data import transforms
from okdph.names import VIEWS

__all__ = [
    "AUTOAUGMENT_POLICY", "CHUNK", "GEOMETRIC_OPS", "RANDAUGMENT_OPS", "VIEWS",
    "apply_op", "apply_op_where", "apply_view", "augment", "autoaugment", "crop_flip", "cutout",
    "hflip_where", "normalize", "random_crop", "randaugment", "randaugment_magnitude",
    "autoaugment_magnitude", "rotate_nearest", "sample_params", "torchvision_op",
]

CHUNK = 4096              # images per chunk: bounds the memory of the ~23 RandAugment variants
PADDING = transforms.CIFAR_PADDING                     # RandomCrop(32, padding=4), zero fill
ROTATION_DEGREES = float(transforms.ROTATION_DEGREES)  # RandomRotation(15)
CUTOUT_LENGTH = transforms.CUTOUT_LENGTH["cifar"]      # Cutout(1 hole, 16 px)
_SIZE = 32                # the only image size supported here

_NEAREST = InterpolationMode.NEAREST
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

# torchvision's own definitions (v1 classes, as used by the CPU pipeline)
_RA = _V1RandAugment()                                    # num_ops 2, magnitude 9, 31 bins, nearest
_AA = _V1AutoAugment(AutoAugmentPolicy.IMAGENET)          # nearest, fill None
_AA_BINS = 10                                             # AutoAugment.forward: _augmentation_space(10, ...)
RANDAUGMENT_OPS: tuple[str, ...] = tuple(_RA._augmentation_space(_RA.num_magnitude_bins, (_SIZE, _SIZE)))
AUTOAUGMENT_POLICY: tuple = tuple(tuple(tuple(op) for op in sub) for sub in _AA.policies)


def randaugment_magnitude(op_name: str, height: int = _SIZE, width: int = _SIZE) -> tuple[float, bool]:
    """(magnitude, signed) of `op_name` in torchvision's default RandAugment (magnitude index 9 of 31)."""
    magnitudes, signed = _RA._augmentation_space(_RA.num_magnitude_bins, (height, width))[op_name]
    return (float(magnitudes[_RA.magnitude].item()) if magnitudes.ndim > 0 else 0.0), signed


def autoaugment_magnitude(op_name: str, magnitude_id: Optional[int], height: int = _SIZE,
                          width: int = _SIZE) -> tuple[float, bool]:
    """(magnitude, signed) of `op_name` at bin `magnitude_id` in torchvision's AutoAugment (10 bins)."""
    magnitudes, signed = _AA._augmentation_space(_AA_BINS, (height, width))[op_name]
    return (float(magnitudes[magnitude_id].item()) if magnitude_id is not None else 0.0), signed


# ------------------------------------------------------------------------------------------------
# Small cached constants per (device, size)
# ------------------------------------------------------------------------------------------------

_CACHE: dict = {}


def _cached(key, make):
    value = _CACHE.get(key)
    if value is None:
        value = _CACHE[key] = make()
    return value


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _index_image(h: int, w: int, device) -> Tensor:
    """(1, 1, h, w) float32 image whose pixel p (row-major) holds p + 1 (0 is left for the fill)."""
    return _cached(("index_image", h, w, _device_key(device)),
                   lambda: torch.arange(1, h * w + 1, dtype=torch.float32, device=device).view(1, 1, h, w))


def _to_source_index(sampled: Tensor, hw: int) -> Tensor:
    """Float index image (values p + 1, 0 = outside) -> long source index, hw meaning 'fill 0'."""
    src = sampled.reshape(sampled.shape[0], hw).to(torch.long) - 1
    return torch.where(src < 0, hw, src)


def _gather_pixels(images: Tensor, index: Tensor) -> Tensor:
    """out[n, c, p] = images[n, c, index[n, p]], index == h*w giving 0 (the fill)."""
    n, c, h, w = images.shape
    flat = torch.cat([images.reshape(n, c, h * w), images.new_zeros(n, c, 1)], dim=2)
    index = index.expand(n, h * w).unsqueeze(1).expand(n, c, h * w)
    return flat.gather(2, index).view(n, c, h, w)


# ------------------------------------------------------------------------------------------------
# Crop, flip, rotation, Cutout, normalisation (explicit per-sample parameters)
# ------------------------------------------------------------------------------------------------

def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Optional[Tensor] = None,
              padding: int = PADDING) -> Tensor:
    """Zero-pad by `padding`, crop (h, w) at per-sample (top, left) of the padded image, then flip
    horizontally where `flip` is True: one gather. Equals F.crop(F.pad(img, [padding]), top, left, h, w)
    (then F.horizontal_flip) image by image."""
    n, _, h, w = images.shape
    dev = images.device
    ys = top.view(n, 1).to(device=dev, dtype=torch.long) - padding + torch.arange(h, device=dev)  # (n, h)
    xs = torch.arange(w, device=dev)
    if flip is not None:
        xs = torch.where(flip.view(n, 1).to(dev), w - 1 - xs, xs)                                # (n, w)
    xs = left.view(n, 1).to(device=dev, dtype=torch.long) - padding + xs
    inside = ((ys >= 0) & (ys < h)).unsqueeze(2) & ((xs >= 0) & (xs < w)).unsqueeze(1)        # (n, h, w)
    index = torch.where(inside, ys.unsqueeze(2) * w + xs.unsqueeze(1), h * w)
    return _gather_pixels(images, index.view(n, h * w))


def random_crop(images: Tensor, top: Tensor, left: Tensor, padding: int = PADDING) -> Tensor:
    """RandomCrop(size=(h, w), padding, fill 0) with per-sample offsets top, left in [0, 2*padding]."""
    return crop_flip(images, top, left, None, padding)


def hflip_where(images: Tensor, mask: Tensor) -> Tensor:
    """Horizontal flip of the samples where `mask` (n,) is True."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def _base_grid(h: int, w: int, device) -> Tensor:
    """torchvision's _affine_grid base grid, (1, h*w, 3) float32."""
    def make():
        base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
        base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
        base[..., 2].fill_(1)
        return base.view(1, h * w, 3)
    return _cached(("base_grid", h, w, _device_key(device)), make)


def _grid_scale(h: int, w: int, device) -> Tensor:
    return _cached(("grid_scale", h, w, _device_key(device)),
                   lambda: torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=device))


def _rot90_index(k: int, h: int, w: int, device) -> Tensor:
    """Source index of torch.rot90(image, k, dims=(-2, -1)) (torchvision's fast path), (h*w,) long."""
    return _cached(("rot90", k, h, w, _device_key(device)),
                   lambda: torch.rot90(torch.arange(h * w, device=device).view(h, w), k, dims=(-2, -1)).reshape(-1))


def _rotation_index(angles: Tensor, h: int, w: int, device) -> Tensor:
    """Per-sample source index (n, h*w) of F.rotate(img, angle, NEAREST, expand=False, center=None)."""
    n = angles.shape[0]
    angle = torch.remainder(angles.to(device=device, dtype=torch.float64), 360.0)  # angle % 360
    # _get_inverse_affine_matrix(center=[0, 0], -angle, translate=0, scale=1, shear=0) in float64:
    # rot = radians(-angle); matrix = [cos, sin, 0, -sin, cos, 0]
    rot = (-angle) * (math.pi / 180.0)
    cos, sin = torch.cos(rot), torch.sin(rot)
    zero = torch.zeros_like(cos)
    theta = torch.stack([cos, sin, zero, -sin, cos, zero], dim=1).to(torch.float32).view(n, 2, 3)
    # _affine_grid, one theta per sample
    rescaled = theta.transpose(1, 2).div(_grid_scale(h, w, device))
    grid = _base_grid(h, w, device).expand(n, h * w, 3).bmm(rescaled).view(n, h, w, 2)
    sampled = nnF.grid_sample(_index_image(h, w, device).expand(n, 1, h, w), grid, mode="nearest",
                              padding_mode="zeros", align_corners=False)
    index = _to_source_index(sampled, h * w)
    # rotate_image's fast paths (angle 0 is an exact identity through the grid as well)
    for k, degrees in ((1, 90.0), (2, 180.0), (3, 270.0)):
        if k == 2 or h == w:
            index = torch.where((angle == degrees).view(n, 1), _rot90_index(k, h, w, device), index)
    return index


def rotate_nearest(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate each sample counter-clockwise by its own angle (degrees) about the image centre, nearest,
    expand=False, fill 0: F.rotate(img, angle, InterpolationMode.NEAREST, fill=0) image by image."""
    n, _, h, w = images.shape
    return _gather_pixels(images, _rotation_index(angles, h, w, images.device))


def cutout(images_float: Tensor, cy: Tensor, cx: Tensor, length: int = CUTOUT_LENGTH) -> Tensor:
    """Zero the square [cy - length//2, cy + length//2) x [cx - length//2, cx + length//2), clipped at
    the borders, in every channel of each sample (the Cutout of okdph/data/transforms.py)."""
    n, _, h, w = images_float.shape
    dev = images_float.device
    half = length // 2
    cy = cy.view(n, 1, 1).to(device=dev, dtype=torch.long)
    cx = cx.view(n, 1, 1).to(device=dev, dtype=torch.long)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    hole = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    return images_float.masked_fill(hole.unsqueeze(1), 0.0)


def _mean_std(info, device) -> tuple[Tensor, Tensor]:
    def make():
        mean = torch.as_tensor(tuple(info.mean), dtype=torch.float32, device=device).view(-1, 1, 1)
        std = torch.as_tensor(tuple(info.std), dtype=torch.float32, device=device).view(-1, 1, 1)
        return mean, std
    return _cached(("mean_std", tuple(info.mean), tuple(info.std), _device_key(device)), make)


def to_float(images: Tensor) -> Tensor:
    """ToTensor on uint8: float32 in [0, 1] (x / 255, as torchvision's ToTensor computes it)."""
    return images.to(torch.float32).div(255)


def normalize(images_float: Tensor, info) -> Tensor:
    """Normalize(info.mean, info.std) as torchvision computes it: (x - mean) / std in float32."""
    mean, std = _mean_std(info, images_float.device)
    return images_float.sub(mean).div(std)


# ------------------------------------------------------------------------------------------------
# RandAugment / AutoAugment ops
# ------------------------------------------------------------------------------------------------

def torchvision_op(image: Tensor, op_name: str, magnitude: float) -> Tensor:
    """The reference: torchvision v2 functional kernels with the parameters of torchvision's
    autoaugment._apply_op (nearest, fill None). `image` is uint8 (..., C, H, W) (or float for the
    geometric ops). Solarize takes its threshold in pixel units (v1 convention)."""
    if op_name == "Identity":
        return image
    if op_name == "ShearX":
        return F.affine_image(image, angle=0.0, translate=[0, 0], scale=1.0,
                              shear=[math.degrees(math.atan(magnitude)), 0.0], interpolation=_NEAREST,
                              fill=None, center=[0, 0])
    if op_name == "ShearY":
        return F.affine_image(image, angle=0.0, translate=[0, 0], scale=1.0,
                              shear=[0.0, math.degrees(math.atan(magnitude))], interpolation=_NEAREST,
                              fill=None, center=[0, 0])
    if op_name == "TranslateX":
        return F.affine_image(image, angle=0.0, translate=[int(magnitude), 0], scale=1.0,
                              interpolation=_NEAREST, shear=[0.0, 0.0], fill=None)
    if op_name == "TranslateY":
        return F.affine_image(image, angle=0.0, translate=[0, int(magnitude)], scale=1.0,
                              interpolation=_NEAREST, shear=[0.0, 0.0], fill=None)
    if op_name == "Rotate":
        return F.rotate_image(image, angle=magnitude, interpolation=_NEAREST, fill=None)
    if op_name == "Brightness":
        return F.adjust_brightness_image(image, 1.0 + magnitude)
    if op_name == "Color":
        return F.adjust_saturation_image(image, 1.0 + magnitude)
    if op_name == "Contrast":
        return F.adjust_contrast_image(image, 1.0 + magnitude)
    if op_name == "Sharpness":
        return F.adjust_sharpness_image(image, 1.0 + magnitude)
    if op_name == "Posterize":
        return F.posterize_image(image, int(magnitude))
    if op_name == "Solarize":
        return F.solarize_image(image, magnitude)
    if op_name == "AutoContrast":
        return F.autocontrast_image(image)
    if op_name == "Equalize":
        return F.equalize_image(image)
    if op_name == "Invert":
        return F.invert_image(image)
    raise ValueError(f"unknown op {op_name!r}")


def _geometric_index(op_name: str, magnitude: float, h: int, w: int, device) -> Tensor:
    """Source index (h*w,) of a fixed geometric op: torchvision's kernel run on an index image (nearest
    sampling copies values, so the result is exactly the pixel map the kernel applies)."""
    return _cached(("geometric", op_name, float(magnitude), h, w, _device_key(device)),
                   lambda: _to_source_index(torchvision_op(_index_image(h, w, device), op_name, magnitude), h * w)[0])


def _sharpness_kernel(channels: int, device) -> Tensor:
    a, b = 1.0 / 13.0, 5.0 / 13.0
    base = _cached(("sharpness_kernel", _device_key(device)),
                   lambda: torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=device))
    return base.expand(channels, 1, 3, 3)


def _adjust_sharpness(image: Tensor, factor: float) -> Tensor:
    """F.adjust_sharpness_image for uint8 (N, C, H, W), line for line, with the blur kernel cached on
    the device (the v2 kernel builds it from a Python list on every call: a host->device copy)."""
    n, c, h, w = image.shape
    if image.numel() == 0 or h <= 2 or w <= 2:
        return image
    output = image.to(dtype=torch.float32, copy=True)
    blurred = nnF.conv2d(output, _sharpness_kernel(c, image.device), groups=c).round_()
    view = output[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=(1.0 - factor))
    return output.clamp_(0, 255).to(image.dtype)


def _autocontrast(image: Tensor) -> Tensor:
    """F.autocontrast_image for uint8, line for line, with torch.where in place of the boolean-mask
    assignments (which sync with the host on CUDA)."""
    float_image = image.to(torch.float32)
    minimum = float_image.amin(dim=(-2, -1), keepdim=True)
    maximum = float_image.amax(dim=(-2, -1), keepdim=True)
    eq_idxs = maximum == minimum
    inv_scale = maximum.sub_(minimum).mul_(1.0 / 255)
    minimum = torch.where(eq_idxs, 0.0, minimum)
    inv_scale = torch.where(eq_idxs, 1.0, inv_scale)
    return float_image.sub_(minimum).div_(inv_scale).clamp_(0, 255).to(image.dtype)


def apply_op(images: Tensor, op_name: str, magnitude: float) -> Tensor:
    """One RandAugment/AutoAugment op with ONE magnitude on a whole uint8 batch (N, C, H, W); for
    every image, bit-identical to torchvision_op(image, op_name, magnitude)."""
    if op_name == "Identity":
        return images
    if op_name in GEOMETRIC_OPS:
        n, _, h, w = images.shape
        return _gather_pixels(images, _geometric_index(op_name, magnitude, h, w, images.device))
    if op_name == "Sharpness":
        return _adjust_sharpness(images, 1.0 + magnitude)
    if op_name == "AutoContrast":
        return _autocontrast(images)
    return torchvision_op(images, op_name, magnitude)


def apply_op_where(images: Tensor, op_name: str, magnitude: float, mask: Tensor) -> Tensor:
    """apply_op on the samples where `mask` (N,) is True, the others unchanged."""
    return torch.where(mask.view(-1, 1, 1, 1), apply_op(images, op_name, magnitude), images)


def _apply_variants(images: Tensor, variant: Tensor, variants: tuple) -> Tensor:
    """Apply variants[variant[n]] = (op_name, magnitude) to sample n. Geometric variants: one gather
    through a table of source-index maps; the others: each computed on the whole batch, then selected."""
    n, _, h, w = images.shape
    dev = images.device
    out = images
    if any(op in GEOMETRIC_OPS for op, _ in variants):
        def make_table():
            identity = torch.arange(h * w, device=dev)
            return torch.stack([_geometric_index(op, m, h, w, dev) if op in GEOMETRIC_OPS else identity
                                for op, m in variants])
        table = _cached(("table", variants, h, w, _device_key(dev)), make_table)
        out = _gather_pixels(images, table[variant])
    for i, (op, m) in enumerate(variants):
        if op == "Identity" or op in GEOMETRIC_OPS:
            continue
        out = torch.where((variant == i).view(n, 1, 1, 1), apply_op(images, op, m), out)
    return out


def _randaugment_tables(h: int, w: int) -> tuple[tuple, list[list[int]]]:
    """Variants (op, signed magnitude) and table[op index][negate] -> variant index."""
    variants, table = [], []
    for op in RANDAUGMENT_OPS:
        m, signed = randaugment_magnitude(op, h, w)
        row = []
        for negate in (False, True):
            v = (op, -m if (signed and negate) else m)
            if v not in variants:
                variants.append(v)
            row.append(variants.index(v))
        table.append(row)
    return tuple(variants), table


def _autoaugment_tables(h: int, w: int) -> list[tuple[tuple, list[list[int]]]]:
    """For each of the 2 steps: variants (Identity first) and table[policy][negate] -> variant index."""
    steps = []
    for i in range(2):
        variants, table = [("Identity", 0.0)], []
        for sub in AUTOAUGMENT_POLICY:
            op, _, magnitude_id = sub[i]
            m, signed = autoaugment_magnitude(op, magnitude_id, h, w)
            row = []
            for negate in (False, True):
                v = (op, -m if (signed and negate) else m)
                if v not in variants:   # 0.0 == -0.0: Color bin 0 is one variant
                    variants.append(v)
                row.append(variants.index(v))
            table.append(row)
        steps.append((tuple(variants), table))
    return steps


def _long_table(rows, device) -> Tensor:
    key = ("long_table", tuple(tuple(r) for r in rows), _device_key(device))
    return _cached(key, lambda: torch.tensor(rows, dtype=torch.long, device=device))


def randaugment(images: Tensor, ops: Tensor, negate: Tensor) -> Tensor:
    """torchvision's RandAugment() (num_ops 2, magnitude 9, 31 bins, nearest) with explicit per-sample
    draws: ops (N, num_ops) indices into RANDAUGMENT_OPS, negate (N, num_ops) bool (the sign of a
    signed op's magnitude). Round r applies RANDAUGMENT_OPS[ops[:, r]] to the result of round r - 1."""
    n, _, h, w = images.shape
    variants, table = _cached(("ra_tables", h, w), lambda: _randaugment_tables(h, w))
    table_t = _long_table(table, images.device)
    ops, negate = ops.to(images.device), negate.to(images.device)
    for r in range(ops.shape[1]):
        images = _apply_variants(images, table_t[ops[:, r], negate[:, r].long()], variants)
    return images


def autoaugment(images: Tensor, policy: Tensor, apply: Tensor, negate: Tensor) -> Tensor:
    """torchvision's AutoAugment(IMAGENET) with explicit per-sample draws: policy (N,) index into
    AUTOAUGMENT_POLICY, apply (N, 2) bool (sub-policy op i is applied), negate (N, 2) bool."""
    n, _, h, w = images.shape
    dev = images.device
    policy, apply, negate = policy.to(dev), apply.to(dev), negate.to(dev)
    for i, (variants, table) in enumerate(_cached(("aa_tables", h, w), lambda: _autoaugment_tables(h, w))):
        variant = torch.where(apply[:, i], _long_table(table, dev)[policy, negate[:, i].long()], 0)
        images = _apply_variants(images, variant, variants)
    return images


# ------------------------------------------------------------------------------------------------
# Sampling and the views
# ------------------------------------------------------------------------------------------------

def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")


def sample_params(view: str, n: int, height: int = _SIZE, width: int = _SIZE,
                  generator: Optional[torch.Generator] = None, device=None) -> dict[str, Tensor]:
    """The per-sample random parameters of `view` for n images, drawn on `device` from `generator`
    with torchvision's distributions:
    - top, left: RandomCrop offsets, uniform integers in [0, 2 * PADDING];
    - flip: RandomHorizontalFlip, rand < 0.5;
    - angle: RandomRotation(15), float32 uniform in [-15, 15);
    - cy, cx: Cutout centre, uniform over the pixels;
    - ops, negate (N, 2): RandAugment op index uniform over RANDAUGMENT_OPS each round, sign 50/50;
    - policy, apply, negate (N, 2): AutoAugment sub-policy uniform over the 25, op i applied when
      rand <= its probability, negated when a fair coin is 0."""
    _check_view(view)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    g = dict(generator=generator, device=device)
    p: dict[str, Tensor] = {}
    if view == "base":
        return p
    p["top"] = torch.randint(0, 2 * PADDING + 1, (n,), **g)
    p["left"] = torch.randint(0, 2 * PADDING + 1, (n,), **g)
    if view in ("hflip", "hflip+rot", "cutout"):
        p["flip"] = torch.rand(n, **g) < 0.5
    if view == "hflip+rot":
        p["angle"] = torch.empty(n, dtype=torch.float32, device=device).uniform_(
            -ROTATION_DEGREES, ROTATION_DEGREES, generator=generator)
    elif view == "cutout":
        p["cy"] = torch.randint(0, height, (n,), **g)
        p["cx"] = torch.randint(0, width, (n,), **g)
    elif view == "augment":
        p["ops"] = torch.randint(0, len(RANDAUGMENT_OPS), (n, _RA.num_ops), **g)
        p["negate"] = torch.randint(0, 2, (n, _RA.num_ops), **g) == 1
    elif view == "auto_aug":
        p["policy"] = torch.randint(0, len(AUTOAUGMENT_POLICY), (n,), **g)
        probs = torch.rand(n, 2, **g)
        table = _cached(("aa_probs", _device_key(device)), lambda: torch.tensor(
            [[op[1] for op in sub] for sub in AUTOAUGMENT_POLICY], dtype=torch.float32, device=device))
        p["apply"] = probs <= table[p["policy"]]
        p["negate"] = torch.randint(0, 2, (n, 2), **g) == 0
    return p


def _apply_chunk(images: Tensor, view: str, info, p: dict[str, Tensor]) -> Tensor:
    if view == "base":
        return normalize(to_float(images), info)
    if view in ("hflip", "hflip+rot", "cutout"):  # the flip is drawn either way: one random stream per view
        x = crop_flip(images, p["top"], p["left"], p["flip"] if info.mirror_invariant else None)
    else:
        x = random_crop(images, p["top"], p["left"])
    if view == "hflip+rot":
        x = rotate_nearest(x, p["angle"])
    elif view == "augment":
        x = randaugment(x, p["ops"], p["negate"])
    elif view == "auto_aug":
        x = autoaugment(x, p["policy"], p["apply"], p["negate"])
    x = to_float(x)
    if view == "cutout":
        x = cutout(x, p["cy"], p["cx"], CUTOUT_LENGTH)
    return normalize(x, info)


def _check_images(images: Tensor, info) -> None:
    if info.image_size != _SIZE:
        raise NotImplementedError(
            f"GPU augmentation supports CIFAR-sized {_SIZE}x{_SIZE} images only, not {info.name!r} "
            f"({info.image_size}x{info.image_size}); use the CPU (reference) data pipeline for it")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 \
            or tuple(images.shape[-2:]) != (_SIZE, _SIZE):
        raise ValueError(f"expected uint8 images of shape (N, 3, {_SIZE}, {_SIZE}), "
                         f"got {images.dtype} {tuple(images.shape)}")


def apply_view(images: Tensor, view: str, info, params: dict[str, Tensor], chunk: Optional[int] = None) -> Tensor:
    """`view` with explicit per-sample parameters (as from sample_params), in chunks; float32 output."""
    _check_view(view)
    _check_images(images, info)
    n = images.shape[0]
    chunk = chunk or CHUNK
    if n <= chunk:
        return _apply_chunk(images, view, info, params)
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    for s in range(0, n, chunk):
        out[s:s + chunk] = _apply_chunk(images[s:s + chunk], view, info, {k: v[s:s + chunk] for k, v in params.items()})
    return out


def augment(images: Tensor, view: str, info, generator: Optional[torch.Generator] = None) -> Tensor:
    """One training view of uint8 images (N, 3, 32, 32) on their device, each sample with its own
    random parameters drawn from `generator` (a torch.Generator on the images' device, or the
    device's default generator when None); returns float32 (N, 3, 32, 32) normalised with
    info.mean / info.std. Views: 'hflip', 'hflip+rot', 'cutout', 'augment', 'auto_aug', 'base'."""
    _check_view(view)
    _check_images(images, info)
    if generator is not None and generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device}, images on {images.device}: "
                         f"use torch.Generator(device=images.device)")
    params = sample_params(view, images.shape[0], images.shape[-2], images.shape[-1],
                           generator=generator, device=images.device)
    return apply_view(images, view, info, params)
