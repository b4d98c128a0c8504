"""PAC-Bayes bound of a trained network (OKDPH supplement Table 5 and Fig. 1; docs/protocol.md#pac-bayes-bound).

    okdph-bench pacbayes results/runs/<run>.json --write          # the record gets metrics.pacbayes
    okdph-bench pacbayes results/runs/*.json --per-epoch --out fig1.png

The paper gives no formula. Following docs/protocol.md#pac-bayes-bound (and LPF-SGD's `pac_bayes`,
Bisla et al. 2022), the bound of weights w (d trainable parameters) trained on m images is

    bound = KL + log(2m/δ),   δ = 1e-6,

with the KL term of a Gaussian posterior N(w, diag σ_i²) against a prior centred at w0 (or 0):

    "init":      σ_i = σ          KL = ‖w − w0‖² / (4σ²)     (w0: the run's initialisation, epoch 0)
    "orig":      σ_i = σ          KL = ‖w‖² / (4σ²)          (prior at 0; LPF-SGD in practice)
    "magnitude": σ_i = α·|w_i|    KL = Σ_i w_i² / (4α²w_i²) = d / (4α²)

σ (or α) is the largest noise scale the network tolerates: a safeguarded search (`search_scale`)
for the scale at which the mean training-loss increase over `samples` Monte-Carlo perturbations,
E[L(w + u)] − L(w), equals ε = 0.1 (stopping when it is within `tolerance` of ε, or after
`max_iterations` evaluations).

Default "magnitude": it is the variant that reproduces the scale of Table 5. Every published value
is (200-240)·d for the repo's own parameter counts d, across five architectures of 0.18M-15M
parameters and both datasets, with under 1% between methods. A magnitude-relative
noise makes the KL term exactly d/(4α²), so that ratio is 1/(4α²) with α ≈ 0.034: noise of about
3.4% of each weight. The absolute-σ variants give ‖w‖²/(4σ²), which has no reason to be
proportional to d; they are kept for comparison. The log term (≈ 19 for CIFAR) is negligible.

Choices the paper leaves open, made here:
- Loss: mean cross-entropy on the run's training split with NO augmentation (the 'base' view),
  network in eval mode (BN running statistics), as both public implementations measure it.
- Perturbed: every trainable parameter (conv/linear weights and biases, BN affine); BN buffers are
  kept. d counts the same parameters (docs/methods.md#parameter-counts: ResNet32/CIFAR-10 466,906).
- Weights: the deployed student (`student0`) at the last saved epoch; `--per-epoch`: every saved one.
- Common random numbers: the `samples` standard-normal directions z_k are drawn once (from a
  torch.Generator seeded with `seed`, on the CPU, so they do not depend on the device) and every
  step of the search scales the same z_k. The Monte-Carlo mean is then a continuous function of the
  scale, so the search converges, and the result is deterministic given the seed.
- A zero weight gets zero noise in the magnitude variant and contributes its limit 1/(4α²).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from okdph.analysis.options import (DEFAULT_EPSILON, DEFAULT_MAX_ITERATIONS, DEFAULT_SAMPLES, DEFAULT_SEED,
                                    DEFAULT_TOLERANCE, DEFAULT_VARIANT, VARIANTS)
from okdph.errors import ConfigError

DEFAULT_DELTA = 1e-6                 # confidence δ of log(2m/δ) (LPF-SGD)
SCALE_RESOLUTION = 1e-5              # also stop once the bracket is this narrow (relative): the
                                     # crossing is located, but the loss jumps there (not converged)
START_SCALE = 0.01                   # first σ or α tried (search_scale grows it until the increase passes ε)
MAX_SCALE = 1e4                      # give up bracketing beyond this (the loss never rose by ε)
UNITS = 1e6                          # Table 5 prints the bound ×10^-6 (render.py reads metrics.pacbayes)


@dataclass
class ScaleSearch:
    scale: float                 # the σ or α found
    increase: float              # the mean loss increase at that scale
    iterations: int              # loss evaluations made
    converged: bool              # |increase − ε| ≤ tolerance
    history: list[tuple[float, float]] = field(default_factory=list)  # (scale, increase) per evaluation


def search_scale(increase_at: Callable[[float], float], *, epsilon: float = DEFAULT_EPSILON,
                 tolerance: float = DEFAULT_TOLERANCE, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                 start: float = START_SCALE, max_scale: float = MAX_SCALE, resolution: float = SCALE_RESOLUTION,
                 guided: bool = True, on_step: Callable[[float, float], None] | None = None) -> ScaleSearch:
    """The scale s at which `increase_at(s)` = ε, assuming the increase grows with s.

    Each evaluation costs a pass over the training set per noise sample, so the search guesses
    where the crossing is instead of halving blindly. Near a minimum the increase is about c·s²,
    so from one side of ε the next scale is the one a power law through the last point predicts:
    c·s² at first, then c·s^p through the last two points (a factor of 1/16 to 16, aimed a little
    past ε so that it brackets). Once ε is bracketed by [lo, hi], the next scale is the secant of
    log increase against log s (exact for any power law c·s^p), kept inside the bracket and
    replaced by a bisection of log s whenever the last step did not halve the bracket's log width,
    so it never needs more than about twice the evaluations of a bisection of log s.

    Stops when |increase − ε| ≤ tolerance, or when hi − lo ≤ resolution·hi (a loss that jumps
    across ε, e.g. a diverged network's). A NaN increase counts as above ε; an increase of zero or
    below (no power law to fit) falls back to doubling or bisecting. Without convergence, the
    evaluated scale closest to ε is returned, marked so. `guided=False`: plain doubling, halving
    and bisection (the baseline `benchmarks/pacbayes_search.py` compares against)."""
    if not (epsilon > 0 and tolerance > 0 and max_iterations >= 1 and start > 0):
        raise ConfigError(f"need epsilon > 0, tolerance > 0, max_iterations >= 1, start > 0; got "
                          f"{epsilon}, {tolerance}, {max_iterations}, {start}")
    lo, lo_increase = 0.0, 0.0
    hi, hi_increase = math.inf, math.inf
    scale, last_width, power = start, math.inf, 2.0
    history: list[tuple[float, float]] = []
    for _ in range(max_iterations):
        increase = increase_at(scale)
        if math.isnan(increase):
            increase = math.inf
        history.append((scale, increase))
        if on_step:
            on_step(scale, increase)
        if abs(increase - epsilon) <= tolerance:
            return ScaleSearch(scale, increase, len(history), True, history)
        power = _local_power(history, epsilon) or power
        if increase < epsilon:
            lo, lo_increase = scale, increase
        else:
            hi, hi_increase = scale, increase
        if not math.isinf(hi) and hi - lo <= resolution * hi:
            break
        width = math.log(hi / lo) if lo > 0 else math.inf  # a bracket's width once ε lies between two scales
        scale = _next_scale(lo, lo_increase, hi, hi_increase, epsilon, guided=guided, power=power,
                            bisect=width > last_width / 2)
        last_width = width
        if scale > max_scale:
            break
    best_scale, best_increase = min(history, key=lambda h: abs(h[1] - epsilon))
    return ScaleSearch(best_scale, best_increase, len(history), False, history)


def _next_scale(lo: float, lo_increase: float, hi: float, hi_increase: float, epsilon: float, *,
                guided: bool, power: float, bisect: bool) -> float:
    """`search_scale`'s next scale from its bracket [lo, hi] (lo = 0: nothing below ε yet; hi = inf:
    nothing above ε yet), the increases measured at its ends and the local power of the increase."""
    if math.isinf(hi):                                   # still below ε: grow, by the power law's guess
        if not guided or lo_increase <= 0:
            return 2 * lo
        return lo * min(max((epsilon / lo_increase) ** (1 / power) * 1.1, 1.25), 16.0)
    if lo == 0.0:                                        # still above ε: shrink, by the power law's guess
        if not guided or not math.isfinite(hi_increase):
            return hi / 2
        return hi * min(max((epsilon / hi_increase) ** (1 / power) * 0.9, 1 / 16), 0.8)
    if not guided:
        return (lo + hi) / 2
    if bisect or lo_increase <= 0 or not math.isfinite(hi_increase):
        return math.sqrt(lo * hi)                        # the bisection of log s
    # the secant of log increase over log scale, kept within the middle 90 % of the bracket
    t_lo, t_hi = math.log(lo), math.log(hi)
    g_lo, g_hi = math.log(lo_increase / epsilon), math.log(hi_increase / epsilon)
    t = t_lo - g_lo * (t_hi - t_lo) / (g_hi - g_lo)
    margin = 0.05 * (t_hi - t_lo)
    return math.exp(min(max(t, t_lo + margin), t_hi - margin))


def _local_power(history: list[tuple[float, float]], epsilon: float) -> float | None:
    """p of the power law c·s^p through the last two evaluations when both lie on the same side of ε
    with positive, finite increases (kept within [0.5, 8]); None otherwise."""
    if len(history) < 2:
        return None
    (s0, i0), (s1, i1) = history[-2:]
    same_side = (i0 < epsilon) == (i1 < epsilon)
    if not (0 < i0 < math.inf and 0 < i1 < math.inf and same_side and s0 != s1 and i0 != i1):
        return None
    return min(max(math.log(i1 / i0) / math.log(s1 / s0), 0.5), 8.0)


def kl_term(variant: str, weights: Tensor, init: Tensor | None, scale: float) -> float:
    """The KL term of the bound for flat weights `weights` (d,) and noise scale σ or α."""
    check_variant(variant)
    weights = weights.double()
    if variant == "magnitude":
        return weights.numel() / (4 * scale ** 2)
    if variant == "init":
        if init is None:
            raise ConfigError("the 'init' variant needs the initial weights (the trajectory's epoch 0)")
        return float((weights - init.double()).pow(2).sum()) / (4 * scale ** 2)
    return float(weights.pow(2).sum()) / (4 * scale ** 2)


def log_term(m: int, delta: float = DEFAULT_DELTA) -> float:
    """log(2m/δ)."""
    return math.log(2 * m / delta)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown PAC-Bayes variant '{variant}'; valid: {', '.join(VARIANTS)}")


def noise_std(variant: str, weights: Tensor, scale: float) -> Tensor | float:
    """Per-weight standard deviation of the posterior: α|w_i| (magnitude) or σ."""
    return scale * weights.abs() if variant == "magnitude" else scale


@dataclass
class PacBayesResult:
    variant: str
    scale_name: str              # "alpha" (magnitude) or "sigma"
    scale: float
    kl_term: float
    log_term: float
    bound: float                 # kl_term + log_term
    m: int                       # training images
    delta: float
    num_params: int              # d
    samples: int
    epsilon: float
    tolerance: float
    max_iterations: int
    seed: int
    iterations: int
    converged: bool
    guided: bool                 # search_scale's guided search (False: doubling and bisection)
    loss: float                  # L(w), training split, no augmentation
    loss_increase: float         # mean L(w + u) − L(w) at the scale found
    history: list = field(default_factory=list)

    @property
    def value(self) -> float:
        """The bound in Table 5's units (×10^-6)."""
        return self.bound / UNITS

    def to_dict(self) -> dict:
        return asdict(self)


def pacbayes_bound(weights: Tensor, loss_of: Callable[[Tensor], Tensor], m: int, *, init: Tensor | None = None,
                   variant: str = DEFAULT_VARIANT, samples: int = DEFAULT_SAMPLES,
                   epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                   tolerance: float = DEFAULT_TOLERANCE, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                   seed: int = DEFAULT_SEED, guided: bool = True, progress: bool = False,
                   desc: str = "pac-bayes") -> PacBayesResult:
    """The bound of flat weights `weights` (d,) whose training loss is `loss_of`: a function from
    K stacked weight vectors (K, d) to their K losses (K,). `init` (d,) is w0 for "init"."""
    check_variant(variant)
    if samples < 1 or m < 1:
        raise ConfigError(f"samples and m must be >= 1, got {samples}, {m}")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(samples, weights.numel(), generator=generator).to(weights.device, weights.dtype)
    base_loss = float(loss_of(weights[None])[0])

    def increase_at(scale: float) -> float:
        perturbed = weights[None] + noise_std(variant, weights, scale) * directions
        return float(loss_of(perturbed).double().mean()) - base_loss

    bar = tqdm(total=max_iterations, desc=desc, unit="step", disable=not progress, leave=False)

    def on_step(scale, increase):
        bar.update(1)
        bar.set_postfix_str(f"{'alpha' if variant == 'magnitude' else 'sigma'}={scale:.4g} Δloss={increase:.4f}")

    try:
        found = search_scale(increase_at, epsilon=epsilon, tolerance=tolerance, max_iterations=max_iterations,
                             guided=guided, on_step=on_step)
    finally:
        bar.close()
    kl = kl_term(variant, weights, init, found.scale)
    log = log_term(m, delta)
    return PacBayesResult(
        variant=variant, scale_name="alpha" if variant == "magnitude" else "sigma", scale=found.scale,
        kl_term=kl, log_term=log, bound=kl + log, m=m, delta=delta, num_params=weights.numel(), samples=samples,
        epsilon=epsilon, tolerance=tolerance, max_iterations=max_iterations, seed=seed,
        iterations=found.iterations, converged=found.converged, guided=guided, loss=base_loss,
        loss_increase=found.increase, history=[list(h) for h in found.history])


# --------------------------------------------------------------------------------------------------
# On a run: its trajectory points, its training images


@dataclass
class PointBound:
    epoch: int
    result: PacBayesResult


def deployed_student(record: dict) -> int:
    """The student a record deploys ("student0" -> 0): the network Table 5 measures."""
    head = str(record.get("deployed_head", "student0"))
    return int(head[len("student"):]) if head.startswith("student") and head[7:].isdigit() else 0


def run_bounds(record_path, *, variant: str = DEFAULT_VARIANT, per_epoch: bool = False, device="cpu",
               data_root="data", samples: int = DEFAULT_SAMPLES, epsilon: float = DEFAULT_EPSILON,
               delta: float = DEFAULT_DELTA, tolerance: float = DEFAULT_TOLERANCE,
               max_iterations: int = DEFAULT_MAX_ITERATIONS, seed: int = DEFAULT_SEED, guided: bool = True,
               batch_size: int | None = None, progress: bool = True) -> tuple[dict, list[PointBound]]:
    """The bound of a run's deployed student at its last saved epoch (every saved epoch with
    `per_epoch`); returns the record and the bounds in epoch order."""
    from okdph.analysis.evaluate import (
        build_network,
        flatten,
        load_run_trajectory,
        load_train_images,
        split_state,
        stacked_loss,
        trainable_names,
        unflatten,
    )

    from okdph.engine.record import load_record

    check_variant(variant)
    device = torch.device(device)
    record_path = Path(record_path)
    points = load_run_trajectory(record_path)
    record = load_record(record_path)  # a damaged record is one line naming it, before any work
    student = deployed_student(record)
    meta = points[0].meta
    if student >= len(points[0].students):
        raise ConfigError(f"{record_path.name}: deployed student {student} is not in its trajectory")
    net = build_network(meta, device)
    names = trainable_names(net)
    data = load_train_images(meta, data_root, device)
    init_params, _ = split_state(points[0].students[student], names)
    init = flatten(init_params, names).to(device)

    out = []
    for point in (points if per_epoch else points[-1:]):
        params, buffers = split_state(point.students[student], names)
        buffers = {n: v.to(device) for n, v in buffers.items()}
        weights = flatten(params, names).to(device)

        def loss_of(stack: Tensor, params=params, buffers=buffers) -> Tensor:  # this point's weights
            return stacked_loss(net, unflatten(stack, params, names), buffers, data,
                                batch_size=batch_size)[0]

        result = pacbayes_bound(weights, loss_of, len(data), init=init, variant=variant, samples=samples,
                                epsilon=epsilon, delta=delta, tolerance=tolerance, max_iterations=max_iterations,
                                seed=seed, guided=guided, progress=progress,
                                desc=f"{meta['method']} epoch {point.epoch}")
        out.append(PointBound(point.epoch, result))
    return record, out


def write_bound(record_path, record: dict, bounds: list[PointBound], *, student: int, seconds: float) -> None:
    """Store the last epoch's bound in the record: `metrics.pacbayes` (×10^-6, what Table 5
    shows) and a `pacbayes` block with how it was obtained (and every epoch's value, if computed)."""
    from okdph.engine.record import atomic_write_json

    last = bounds[-1]
    block = {**last.result.to_dict(), "epoch": last.epoch, "student": student, "units": UNITS,
             "value": last.result.value, "seconds": seconds}
    if len(bounds) > 1:
        block["per_epoch"] = [{"epoch": b.epoch, "value": b.result.value, "scale": b.result.scale,
                               "converged": b.result.converged} for b in bounds]
    record.setdefault("metrics", {})["pacbayes"] = last.result.value
    record["pacbayes"] = block
    atomic_write_json(Path(record_path), record)


def compute_and_write(record_path, **options) -> PacBayesResult:
    """`run_bounds` at the last epoch, written into the record (what `run --table 5` calls)."""
    started = time.perf_counter()
    record, bounds = run_bounds(record_path, **options)
    write_bound(record_path, record, bounds, student=deployed_student(record), seconds=time.perf_counter() - started)
    return bounds[-1].result


def plot_per_epoch(series: list[tuple[str, list[PointBound]]], path, title: str = "") -> Path:
    """Fig. 1: the bound (×10^6) against the epoch, one line per run; PNG at `path` and the data
    beside it as JSON (same name, .json) so it can be redrawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from okdph.engine.record import atomic_write_json

    path = Path(path)
    fig = Figure(figsize=(5.0, 3.4), dpi=120)
    ax = fig.add_subplot()
    for label, bounds in series:
        ax.plot([b.epoch for b in bounds], [b.result.value for b in bounds], marker="o", markersize=3,
                linewidth=1.3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("PAC-Bayes bound (×10$^6$)")
    ax.set_title(title or "PAC-Bayes bound during training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    atomic_write_json(path.with_suffix(".json"), {"title": title, "units": UNITS, "series": [
        {"label": label, "epochs": [b.epoch for b in bounds], "values": [b.result.value for b in bounds],
         "variant": bounds[0].result.variant} for label, bounds in series]})
    return path
