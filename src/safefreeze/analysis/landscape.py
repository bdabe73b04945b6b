"""Loss landscape and sharpness around trained adapter weights (the paper's regularisation claim).

For a run directory (report.json + adapter/), on a fixed set of training examples (eval
mode, so every number is deterministic):

- 1-D and 2-D loss surfaces L(θ + α·d₁ + β·d₂) along random directions restricted to the
  adapter parameters and *filter-normalised* (Li et al., 2018, "Visualizing the Loss
  Landscape of Neural Nets"): every row (output filter) of a direction is rescaled to the
  norm of the same row of θ, so runs whose weights differ in scale are compared fairly. A
  row of θ that is zero (e.g. LoRA's B never trained) gets a zero direction.
- the top Hessian eigenvalue λ_max of the training loss with respect to those parameters,
  by power iteration on Hessian-vector products (double backward; Pearlmutter's trick): the
  usual sharpness number, smaller = flatter.
- adapter weight norms per unit: ‖θ_unit‖ and the norm of the update it adds, ‖ΔW‖_F.

The adapter parameters are those of *every* adapter unit by default (the same space for
LoRA and SAFE, frozen units included, since they are part of the solution), or only the
units still trainable at the end of training (``scope="trainable"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from peft import PeftModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from safefreeze.core.config import ConfigError
from safefreeze.core.units import AdapterUnit, find_units
from safefreeze.training.data import Collator, epoch_order
from safefreeze.training.train import TrainConfig, prepare

LossTerms = Callable[[], Iterable[torch.Tensor]]  # yields weighted terms whose sum is the loss
SCOPES = ("all", "trainable")


# -- primitives (any parameters, any loss) ---------------------------------------------
def loss_value(loss_terms: LossTerms) -> float:
    """The loss, without grad."""
    with torch.no_grad():
        return float(sum(float(term) for term in loss_terms()))


def hessian_vector_product(
    loss_terms: LossTerms, params: list[torch.Tensor], vector: list[torch.Tensor]
) -> list[torch.Tensor]:
    """H·v of the loss w.r.t. ``params``, summed term by term so one term's graph lives at a time."""
    product = [torch.zeros_like(p) for p in params]
    # The math SDPA kernel is twice differentiable; the fused CPU/CUDA kernels are not.
    with sdpa_kernel(SDPBackend.MATH):
        for term in loss_terms():
            grads = torch.autograd.grad(term, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
            for total, part in zip(product, torch.autograd.grad(dot, params), strict=True):
                total += part
    return product


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _power_iteration(
    product: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    start: list[torch.Tensor],
    iterations: int,
    tol: float,
) -> float:
    """Dominant eigenvalue of a symmetric operator: v ← Mv/‖Mv‖, λ = vᵀMv, until λ moves by < tol·|λ|."""
    norm = math.sqrt(_dot(start, start))
    vector = [v / norm for v in start]
    eigenvalue = 0.0
    for _ in range(iterations):
        result = product(vector)
        previous, eigenvalue = eigenvalue, _dot(vector, result)
        norm = math.sqrt(_dot(result, result))
        if norm == 0:
            return 0.0
        vector = [r / norm for r in result]
        if abs(eigenvalue - previous) <= tol * abs(eigenvalue):
            break
    return eigenvalue


def top_hessian_eigenvalue(
    loss_terms: LossTerms, params: list[torch.Tensor], iterations: int = 30, tol: float = 1e-4, seed: int = 0
) -> float:
    """Largest (most positive) Hessian eigenvalue λ_max, by power iteration on Hessian-vector products.

    Power iteration finds the eigenvalue of largest magnitude, λ₁. Away from a minimum that
    can be negative; then it is run again on H − λ₁I, whose dominant eigenvalue is
    λ_max − λ₁ ≥ 0. Each run stops when λ moves by less than ``tol``·|λ| or after
    ``iterations`` products. Deterministic given ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]

    def hessian(vector: list[torch.Tensor]) -> list[torch.Tensor]:
        return hessian_vector_product(loss_terms, params, vector)

    dominant = _power_iteration(hessian, start, iterations, tol)
    if dominant >= 0:
        return dominant

    def shifted(vector: list[torch.Tensor]) -> list[torch.Tensor]:
        return [hv - dominant * v for hv, v in zip(hessian(vector), vector, strict=True)]

    return dominant + _power_iteration(shifted, start, iterations, tol)


def filter_normalized_direction(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction with each row rescaled to the norm of the same row of the parameter.

    Rows are slices along dim 0 (a linear layer's output filters); a 1-D parameter is one filter.
    """
    direction = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        rows, d_rows = (p.reshape(p.shape[0], -1), d.reshape(p.shape[0], -1)) if p.dim() > 1 else (p[None], d[None])
        scale = rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction.append((d_rows * scale).reshape(p.shape))
    return direction


def symmetric_grid(points: int, span: float) -> list[float]:
    """``points`` (odd) offsets from −span to span with an exact 0 in the middle."""
    if points < 3 or points % 2 == 0:
        raise ConfigError(f"landscape points must be odd and >= 3, got {points}")
    half = points // 2
    return [span * (i - half) / half for i in range(points)]


def loss_surface(
    loss_terms: LossTerms, params: list[torch.Tensor], directions: list[list[torch.Tensor]], grid: list[float]
) -> list:
    """L(θ + Σ αᵢ·dᵢ) on ``grid``^len(directions) (1 or 2 directions); θ is restored afterwards."""
    origin = [p.detach().clone() for p in params]

    def at(offsets: tuple[float, ...]) -> float:
        with torch.no_grad():
            for p, p0, *ds in zip(params, origin, *directions, strict=True):
                p.copy_(p0 + sum(a * d for a, d in zip(offsets, ds, strict=True)))
        return loss_value(loss_terms)

    try:
        if len(directions) == 1:
            return [at((a,)) for a in grid]
        if len(directions) == 2:
            return [[at((a, b)) for b in grid] for a in grid]
        raise ValueError("loss_surface takes one or two directions")
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, origin, strict=True):
                p.copy_(p0)


# -- a trained run ----------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A run's report, its model with the trained adapter, the adapter units and the loss on fixed examples."""

    report: dict
    model: nn.Module
    units: list[AdapterUnit]
    batches: list[dict[str, torch.Tensor]]

    def loss_terms(self) -> Iterable[torch.Tensor]:
        """Per batch: its mean loss × its share of the examples (classification) or target tokens (causal LM)."""
        weights = [_weight(batch) for batch in self.batches]
        total = sum(weights)
        for batch, weight in zip(self.batches, weights, strict=True):
            yield self.model(**batch).loss * (weight / total)

    def parameters(self, scope: str = "all") -> list[nn.Parameter]:
        """The adapter parameters the landscape is taken over (see module docstring)."""
        if scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        frozen = {u["name"] for u in self.report["units"] if u["frozen_at_step"] is not None}
        units = [u for u in self.units if scope == "all" or u.name not in frozen]
        if not units:
            raise ConfigError("no adapter unit was trainable at the end of this run; use scope 'all'")
        return [p for unit in units for p in unit.parameters()]


def _weight(batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else labels.shape[0]


def load_run(run_dir: Path, examples: int = 32, batch_size: int = 16) -> LoadedRun:
    """Rebuild the base model as training did, load RUN_DIR/adapter onto it, fix the training examples."""
    run_dir = Path(run_dir)
    if not (run_dir / "report.json").exists() or not (run_dir / "adapter").is_dir():
        raise ConfigError(
            f"{run_dir} is not an adapter run (report.json and adapter/); train one with safefreeze train"
        )
    report = json.loads((run_dir / "report.json").read_text())
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in report["config"].items() if k in known})
    # method "full" makes prepare() return the bare base model, seeded as in training.
    task, tokenizer, train_examples, _, base = prepare(replace(config, method="full", reference=None))
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    units = find_units(model)
    for unit in units:
        for p in unit.parameters():
            p.requires_grad_(True)
    collate = Collator(tokenizer, task.kind)
    chosen = [train_examples[i] for i in epoch_order(len(train_examples), config.seed, epoch=-2)[:examples]]
    batches = [collate(chosen[i : i + batch_size]) for i in range(0, len(chosen), batch_size)]
    return LoadedRun(report, model, units, batches)


def unit_norms(units: list[AdapterUnit]) -> list[dict]:
    """Per unit: ‖θ_unit‖ (all its adapter weights) and ‖ΔW‖_F (the update it adds, scale included)."""
    rows = []
    for unit in units:
        weights = math.sqrt(sum(float(p.detach().double().square().sum()) for p in unit.parameters()))
        deltas = 0.0
        for module in unit.modules.values():
            for adapter in module.active_adapters:
                deltas += float(module.get_delta_weight(adapter).detach().double().square().sum())
        rows.append({"unit": unit.name, "weight_norm": weights, "delta_norm": math.sqrt(deltas)})
    return rows


def analyse(
    run_dir: Path,
    seed: int = 0,
    points_1d: int = 21,
    points_2d: int = 9,
    span: float = 1.0,
    examples: int = 32,
    iterations: int = 30,
    scope: str = "all",
) -> dict:
    """Loss at θ, 1-D and 2-D surfaces, λ_max and unit norms of one run (all seeded by ``seed``)."""
    run = load_run(run_dir, examples)
    params = run.parameters(scope)
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(params, generator)
    d2 = filter_normalized_direction(params, generator)
    grid_1d, grid_2d = symmetric_grid(points_1d, span), symmetric_grid(points_2d, span)
    return {
        "run": str(run_dir),
        "method": run.report["method"],
        "seed": run.report["seed"],
        "scope": scope,
        "parameters": sum(p.numel() for p in params),
        "loss": loss_value(run.loss_terms),
        "grid_1d": grid_1d,
        "surface_1d": loss_surface(run.loss_terms, params, [d1], grid_1d),
        "grid_2d": grid_2d,
        "surface_2d": loss_surface(run.loss_terms, params, [d1, d2], grid_2d),
        "hessian_top_eigenvalue": top_hessian_eigenvalue(run.loss_terms, params, iterations, seed=seed),
        "unit_norms": unit_norms(run.units),
    }


def _runs_in(directory: Path) -> dict[str, Path]:
    if (directory / "report.json").exists():
        return {directory.name: directory}
    runs = {sub.name: sub for sub in sorted(directory.iterdir()) if (sub / "adapter").is_dir()}
    if not runs:
        raise ConfigError(f"{directory} holds no adapter run (report.json + adapter/) nor sub-directories with one")
    return runs


def _rise(result: dict) -> float:
    """Mean loss increase at the ends of the 1-D curve (α = ±span): a direct flatness number."""
    curve = result["surface_1d"]
    return (curve[0] + curve[-1]) / 2 - result["loss"]


def render_table(results: dict[str, dict]) -> str:
    """The Markdown comparison: loss at θ, λ_max, 1-D rise at ±span, mean ‖ΔW‖ per unit."""
    lines = [
        "| run | loss at θ | λ_max (Hessian) | 1-D loss rise at ±span | 2-D mean loss rise | mean ‖ΔW‖_F per unit |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        flat = [v for row in r["surface_2d"] for v in row]
        mean_delta = sum(u["delta_norm"] for u in r["unit_norms"]) / len(r["unit_norms"])
        lines.append(
            f"| {name} | {r['loss']:.4f} | {r['hessian_top_eigenvalue']:.4f} | {_rise(r):.4f} | "
            f"{sum(flat) / len(flat) - r['loss']:.4f} | {mean_delta:.4f} |"
        )
    return "\n".join(lines) + "\n"


def draw(results: dict[str, dict], path: Path) -> Path:
    """One figure: 1-D curves overlaid, a 2-D contour per run (shared levels), ‖ΔW‖ per unit."""
    figure = Figure(figsize=(4.2 * (len(results) + 2), 3.8))
    panels = figure.subplots(1, len(results) + 2)
    low = min(v for r in results.values() for row in r["surface_2d"] for v in row)
    high = max(v for r in results.values() for row in r["surface_2d"] for v in row)
    levels = [low + (high - low) * i / 14 for i in range(15)] if high > low else 15
    for name, r in results.items():
        panels[0].plot(r["grid_1d"], r["surface_1d"], label=f"{name} (λ_max {r['hessian_top_eigenvalue']:.3g})")
        panels[-1].plot(range(len(r["unit_norms"])), [u["delta_norm"] for u in r["unit_norms"]], "o-", label=name)
    for axes, (name, r) in zip(panels[1:-1], results.items(), strict=True):
        contour = axes.contourf(r["grid_2d"], r["grid_2d"], r["surface_2d"], levels=levels, cmap="viridis")
        axes.plot(0, 0, "w+", markersize=10)
        axes.set(title=f"{name}: 2-D loss surface", xlabel="β (direction 2)", ylabel="α (direction 1)")
    figure.colorbar(contour, ax=panels[-2], label="training loss")
    panels[0].set(title="1-D loss along a filter-normalised direction", xlabel="α", ylabel="training loss")
    panels[0].legend(fontsize=8)
    panels[-1].set(title="adapter update norm per unit", xlabel="unit (bottom → top)", ylabel="‖ΔW‖_F")
    panels[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def landscape(directory: Path, **options) -> dict[str, dict]:
    """Analyse the run in ``directory`` or every adapter run under it with the same seeded directions.

    Writes landscape.json, landscape.md (the table) and landscape.png (the figure) into ``directory``.
    """
    directory = Path(directory)
    results = {name: analyse(path, **options) for name, path in _runs_in(directory).items()}
    (directory / "landscape.json").write_text(json.dumps(results, indent=1))
    table = render_table(results)
    draw(results, directory / "landscape.png")
    (directory / "landscape.md").write_text(
        "# Loss landscape and sharpness\n\n"
        f"Directions: filter-normalised, seed {options.get('seed', 0)}, scope {options.get('scope', 'all')}; "
        "loss on fixed training examples in eval mode.\n\n" + table + "\n![landscape](landscape.png)\n"
    )
    return results
