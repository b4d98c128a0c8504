"""OKDPH: online knowledge distillation with parameter hybridization (Zhang et al., CVPR 2023).

N students of one architecture learn from each other and from a hybrid-weight model (HWM) whose
parameters are a convex combination of theirs, rebuilt every batch; every Δ batches or epochs the
students are pulled towards the HWM (fusion). Main-paper equations (docs/methods.md#okdph):

    (4) θ_h = Σ_j r_j θ_j,                 r ~ Dir(1_N) resampled every batch
    (5) θ_i ← γ·θ_h + (1 − γ)·θ_i          when the batch or epoch index is a multiple of Δ
    (6) z_en = mean(z_1, …, z_N, z_h)      every model on its own augmentation view
    (7) L_kd(z_i) = T²·KL(σ_T(sg(z_en)) ‖ σ_T(z_i))
    (8) L_i = ω·CE(z_i) + (1 − ω)·CE(z_h) + β·L_kd(z_i)

Fidelities (docs/methods.md#what-each-fidelity-changes, docs/methods.md#okdph):
- official: what src/OKDPH.py runs. r_j = 1/N; the HWM is a separate network whose whole state
  (parameters and BN buffers) is overwritten with the students' mean before each batch, so
  CE(z_h) reaches no student (its (1 − ω) term only shifts the logged loss).
- paper: r ~ Dir(1_N) every batch and the HWM forward runs through θ_h = Σ r_j θ_j itself, so the
  gradient of (1 − ω)·CE(z_h) reaches student j as (1 − ω)·r_j·∇_θh CE(z_h): exactly ∂L_j/∂θ_j of
  Eq. (8), with the HWM term counted once per student.

Shared by both (as the official code; the paper says nothing else): the HWM runs in train mode, so
its forward updates its averaged BN buffers once; fusion copies from that HWM state, i.e. the
pre-step student average of the fusion batch (or of the epoch's last batch for epoch-level
fusion, which runs after the epoch's test and scheduler step, from epoch 0); fusion covers the
whole state including BN buffers and leaves momentum buffers alone; students start identical.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from okdph import multi_tensor
from okdph.errors import ConfigError
from okdph.losses import kd_loss
from okdph.models import make_students
from okdph.strategy import Interval, Strategy, check_positive, check_unit_range, register_strategy

# --------------------------------------------------------------------------------------------------
# Parameter hybridization and fusion: pure tensor math, shared with the fast engine and the tests.


def hybrid_state(states: Sequence[Mapping[str, Tensor]], coefficients: Tensor) -> dict[str, Tensor]:
    """Eq. (4) over whole state dicts: Σ_j r_j·state_j for every entry, BN buffers included.

    Integer entries (BN's num_batches_tracked) are mixed in float32 and truncated back, as
    `load_state_dict` does with the official code's float32 result (docs/methods.md#hybrid-weight-model):
    with 3 students, counters of 7 give 7 there, where float64 would give 6.999... and 6. The sum runs
    in student order, which reproduces the official accumulation bit for bit, with multi-tensor
    kernels (okdph.multi_tensor) over the floating entries.
    """
    keys = list(states[0])
    floats = [k for k in keys if states[0][k].is_floating_point()]
    acc = multi_tensor.mul([states[0][k] for k in floats], coefficients[0])
    for j in range(1, len(states)):
        acc = multi_tensor.add(multi_tensor.mul([states[j][k] for k in floats], coefficients[j]), acc)
    out = dict(zip(floats, acc))
    weights = coefficients.float()  # the official int64 * Python float is float32, in fp64 runs too
    for key in keys:
        if key not in out:
            mixed = states[0][key].float() * weights[0]
            for j in range(1, len(states)):
                mixed = states[j][key].float() * weights[j] + mixed
            out[key] = mixed.to(states[0][key].dtype)
    return {key: out[key] for key in keys}


def load_state_(targets: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """`load_state_dict` for aliasing state views, in one multi-tensor copy."""
    with torch.no_grad():
        multi_tensor.copy_([targets[k] for k in values], list(values.values()))


def fuse_(student: Mapping[str, Tensor], hwm: Mapping[str, Tensor], gamma: float) -> None:
    """Eq. (5) in place on a student's state: γ = 0 keeps it, γ = 1 copies the HWM, otherwise
    γ·θ_h + (1 − γ)·θ_i (the official expression, evaluated in that order; integer entries as floats
    truncated back)."""
    if gamma == 0.0:
        return
    with torch.no_grad():
        if gamma == 1.0:
            load_state_(student, {k: hwm[k] for k in student})
            return
        floats = [k for k, v in student.items() if v.is_floating_point()]
        mixed = multi_tensor.add(multi_tensor.mul([hwm[k] for k in floats], gamma),
                                 multi_tensor.mul([student[k] for k in floats], 1.0 - gamma))
        multi_tensor.copy_([student[k] for k in floats], mixed)
        for key, value in student.items():
            if not value.is_floating_point():
                value.copy_((hwm[key].float() * gamma + value.float() * (1.0 - gamma)).to(value.dtype))


def dirichlet_coefficients(count: int, device, generator: Optional[torch.Generator] = None) -> Tensor:
    """r ~ Dir(1_N), uniform on the simplex: normalised i.i.d. Exp(1) draws, as −log(1 − U).

    Out of place, so that packed runs (vmap over runs, okdph.engine.packed) draw per run."""
    draws = -torch.log1p(-torch.rand(count, device=device, generator=generator))
    return draws / draws.sum()


# --------------------------------------------------------------------------------------------------
# Views per model (supplement §1-2; docs/methods.md#okdph-views). The last view is the HWM's.

_VIEWS = {
    # students: 2, 3, 4; "rot" marks the CIFAR-100 family whose first view adds the rotation.
    "cifar": {2: ["hflip", "cutout", "augment"],
              3: ["hflip", "cutout", "augment", "auto_aug"],
              # Supplement: "the fourth student is not used data augmentation". The repo README's
              # example gives 'base' to the HWM instead (hflip cutout augment auto_aug base).
              4: ["hflip", "cutout", "augment", "base", "auto_aug"]},
    "imagenet": {2: ["hflip", "augment", "auto_aug"]},
}


def default_views(dataset, num_students: int) -> list[str]:
    family = dataset.family
    table = _VIEWS[family]
    if num_students not in table:
        raise ConfigError(
            f"no published view assignment for OKDPH with {num_students} students on {dataset.name}; "
            f"pass views=<{num_students + 1} comma-separated views> (published: {sorted(table)} students)"
        )
    views = list(table[num_students])
    if family == "cifar" and dataset.default_view == "hflip+rot":
        views[0] = "hflip+rot"  # CIFAR-100 uses composition 2 where CIFAR-10 uses 1
    return views


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OKDPHConfig:
    omega: float = 0.8                      # ω, weight of the student's CE (OKDPH.py --omega)
    beta: float = 0.8                       # β, weight of the KD term (--beta)
    gamma: float = 0.5                      # γ, fusion ratio (--gamma)
    interval: Optional[Interval] = Interval(1, "epoch")  # Δ, fusion interval (--interval 1_epoch)
    temperature: float = 4.0                # T of Eq. (7) (--T)
    coefficients: str = "fidelity"          # HWM weights: "mean", "dirichlet" or the fidelity's own
    same_init: bool = True                  # students start identical (official unless --diff_init)
    views: str = ""                         # comma-separated views, students then HWM; "" = published

    def __post_init__(self):
        for name in ("omega", "beta", "gamma"):
            check_unit_range(name, getattr(self, name))
        check_positive("temperature", self.temperature)
        if self.coefficients not in ("fidelity", "mean", "dirichlet"):
            raise ConfigError(f"unknown coefficients '{self.coefficients}'; valid: dirichlet, fidelity, mean")
        object.__setattr__(self, "interval", Interval.parse(self.interval))


@register_strategy("okdph")
class OKDPH(Strategy):
    """N students + one hybrid-weight model; students distil from the mean of all N + 1 logits."""

    Config = OKDPHConfig
    display_name = "OKDPH"
    min_models = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.students = make_students(self.backbone, self.num_classes, self.num_models, self.width,
                                      same_init=self.config.same_init)
        # The HWM has no optimizer: its state is rebuilt from the students before every batch.
        self.hwm = copy.deepcopy(self.students[0]).requires_grad_(False)
        coefficients = self.config.coefficients
        if coefficients == "fidelity":
            coefficients = "mean" if self.fidelity == "official" else "dirichlet"
        self.coefficient_kind = coefficients
        if self.config.views:
            self._views = [v.strip() for v in self.config.views.split(",")]
            if len(self._views) != self.num_models + 1:
                raise ConfigError(f"views needs {self.num_models + 1} entries (students, then the HWM), "
                                  f"got {len(self._views)}")
        else:
            self._views = default_views(self.dataset, self.num_models)

    def views(self):
        return self._views

    def _coefficients(self, device, dtype: torch.dtype) -> Tensor:
        if self.coefficient_kind == "mean":
            # In the networks' dtype (the images' dtype): the official code multiplies by the Python
            # float 1/N, which a float32 tensor would round (1/3 by 3e-8, a drift float64 runs show).
            return torch.full((self.num_models,), 1.0 / self.num_models, device=device, dtype=dtype)
        return dirichlet_coefficients(self.num_models, device)

    def _hwm_logits(self, image: Tensor, coefficients: Tensor) -> Tensor:
        """Rebuild the HWM from the students' current state, then run it on its own view."""
        with torch.no_grad():
            load_state_(self.hwm.state_dict(keep_vars=True), hybrid_state(self.students.member_states(), coefficients))
        if self.fidelity == "official":
            with torch.no_grad():
                return self.hwm(image)
        # paper: the same parameter values, but as a differentiable function of the students'.
        members = [self.students.member_parameters(j) for j in range(self.num_models)]
        params = hybrid_state(members, coefficients)
        return functional_call(self.hwm, params, (image,))

    def forward_train(self, images, targets, *, epoch, step):
        n = self.num_models
        coefficients = self._coefficients(targets.device, images[n].dtype)
        hwm_logits = self._hwm_logits(images[n], coefficients)
        logits = self.students(images[:n])
        teacher = torch.cat([logits, hwm_logits[None]]).detach().mean(dim=0)
        cfg = self.config
        losses = {"ce/hwm": (1 - cfg.omega) * F.cross_entropy(hwm_logits, targets)}
        for k, z in enumerate(logits):
            losses[f"ce/student{k}"] = cfg.omega * F.cross_entropy(z, targets)
            losses[f"kd/student{k}"] = cfg.beta * kd_loss(z, teacher, cfg.temperature)
        heads = {f"student{k}": z for k, z in enumerate(logits)}
        heads["hwm"] = hwm_logits
        return heads, losses

    def fuse(self) -> None:
        hwm_state = self.hwm.state_dict()
        for student in self.students.member_states():
            fuse_(student, hwm_state, self.config.gamma)

    def graph_key(self, *, epoch, step):
        interval = self.config.interval
        if interval is not None and interval.unit == "batch":
            return step % interval.count == 0  # a fusion batch runs the fusion kernels
        return None

    def after_step(self, *, epoch, step):
        interval = self.config.interval
        if interval is not None and interval.unit == "batch" and step % interval.count == 0:
            self.fuse()

    def after_epoch(self, *, epoch):
        interval = self.config.interval
        if interval is not None and interval.unit == "epoch" and epoch % interval.count == 0:
            self.fuse()

    def eval_heads(self, images):
        heads = super().eval_heads(images)
        heads["hwm"] = self.hwm(images)
        return heads

    def head_names(self):
        return super().head_names() + ["hwm"]

    def describe(self):
        return {"hwm_coefficients": self.coefficient_kind,
                "hwm_gradient_to_students": self.fidelity == "paper",
                "views": self._views}
