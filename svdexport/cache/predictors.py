"""Forecasts of the principal coefficients C on cached steps.

Each predictor sees C on every full step (`update`) and returns the coefficients P to use on a cached
step (`predict`); the residual is reused or forecast by `ResidualForecast`, except under `Fitted`, whose
weights cover both parts. Steps are sampler step indices, so forecasts are in step units and handle the
uneven spacing between warmup and interval.
"""

from __future__ import annotations

from typing import Callable

import torch

from svdexport.errors import SvdExportError


class Predictor:
    """Base: holds the state of one request; `reset` clears it."""

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, step: int, coeffs: torch.Tensor) -> None:
        raise NotImplementedError

    def predict(self, step: int) -> torch.Tensor:
        raise NotImplementedError


class Reuse(Predictor):
    """FORA-style: the last full step's coefficients, so F^ is that step's feature exactly."""

    def reset(self) -> None:
        self.last = None

    def update(self, step: int, coeffs: torch.Tensor) -> None:
        self.last = coeffs

    def predict(self, step: int) -> torch.Tensor:
        return self.last


class Ema(Predictor):
    """The paper's rule: C_ema <- beta*C_ema + (1-beta)*C on full steps, held between them."""

    def __init__(self, beta: float):
        self.beta = beta

    def reset(self) -> None:
        self.state = None

    def update(self, step: int, coeffs: torch.Tensor) -> None:
        self.state = coeffs if self.state is None else torch.lerp(coeffs, self.state, self.beta)

    def predict(self, step: int) -> torch.Tensor:
        return self.state


class EmaVelocity(Predictor):
    """EMA (weight beta on the old value) of dC/dstep, extrapolated from the last full step."""

    def __init__(self, beta: float):
        self.beta = beta

    def reset(self) -> None:
        self.last, self.last_step, self.velocity = None, 0, None

    def update(self, step: int, coeffs: torch.Tensor) -> None:
        if self.last is not None:
            v = (coeffs - self.last) / (step - self.last_step)
            self.velocity = v if self.velocity is None else torch.lerp(v, self.velocity, self.beta)
        self.last, self.last_step = coeffs, step

    def predict(self, step: int) -> torch.Tensor:
        if self.velocity is None:
            return self.last
        return self.last + (step - self.last_step) * self.velocity


class SvdTaylor(Predictor):
    """TaylorSeer's finite-difference forecast on the principal coefficients.

    Uses Newton divided differences over the last order+1 full steps, so the forecast is the exact
    extrapolating polynomial even where full steps are unevenly spaced (TaylorSeer's plain backward
    differences are exact there only for order 1).
    """

    def __init__(self, order: int):
        self.order = order

    def reset(self) -> None:
        self.points: list[tuple[int, torch.Tensor]] = []
        self.nodes: list[int] = []
        self.coefs: list[torch.Tensor] = []

    def update(self, step: int, coeffs: torch.Tensor) -> None:
        self.points = (self.points + [(step, coeffs)])[-(self.order + 1) :]
        self.nodes = [s for s, _ in reversed(self.points)]  # newest first
        table = [c for _, c in reversed(self.points)]
        self.coefs = [table[0]]
        for j in range(1, len(table)):
            table = [(table[i] - table[i + 1]) / (self.nodes[i] - self.nodes[i + j]) for i in range(len(table) - 1)]
            self.coefs.append(table[0])

    def predict(self, step: int) -> torch.Tensor:
        out, weight = self.coefs[0], 1.0
        for j in range(1, len(self.coefs)):
            weight *= step - self.nodes[j - 1]
            out = out + weight * self.coefs[j]
        return out


class Fitted(Predictor):
    """Weights fitted on the calibration trajectories (cache/fitted.py): on cached step i, a X_j + b X_k of
    the last two full steps' values, with (a, b) per site (or per site and coefficient) given per step of the
    request's static plan. One instance forecasts the principal coefficients, another the residuals."""

    def __init__(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.weights = weights  # step -> (a, b), each [sites] or [sites, k] float32
        self.placed: tuple | None = None  # (device, dtype, dims) the weights were last made ready for

    def reset(self) -> None:
        self.last: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None

    def update(self, step: int, coeffs: torch.Tensor) -> None:
        self.prev, self.last = self.last, coeffs
        if self.placed != (where := (coeffs.device, coeffs.dtype, coeffs.dim())):
            # Once, not per cached step: on the features' device and dtype, viewed to broadcast over
            # X [sites, batch, tokens, dim] ([sites] weights per site, [sites, k] per coefficient too).
            def ready(w: torch.Tensor) -> torch.Tensor:
                shape = (w.shape[0],) + (1,) * (coeffs.dim() - w.dim()) + tuple(w.shape[1:])
                return w.to(coeffs.device, coeffs.dtype).view(shape)

            self.weights = {i: (ready(a), ready(b)) for i, (a, b) in self.weights.items()}
            self.placed = where

    def predict(self, step: int) -> torch.Tensor:
        a, b = self.weights[step]
        return a * self.last if self.prev is None else a * self.last + b * self.prev


# Predictors whose weights come from the engine's plan statistics and plan, not from (beta, order).
FITTED = ("svd-fitted",)

# The one registry of predictors: name -> constructor from (beta, order). The CLI's choices, the config's
# validation and the compare variants all read it.
PREDICTORS: dict[str, Callable[[float, int], Predictor]] = {
    "svd-taylor": lambda beta, order: SvdTaylor(order),
    "ema-velocity": lambda beta, order: EmaVelocity(beta),
    "ema": lambda beta, order: Ema(beta),
    "reuse": lambda beta, order: Reuse(),
    "svd-fitted": lambda beta, order: _needs_weights(),
}


# The settings each predictor takes (CacheConfig's fields of the same names): svd-taylor's order, the EMAs'
# beta, and gamma for every rule predictor's residual forecast (ResidualForecast); a fitted forecast's weights
# cover the residual too, so it takes none. The CLI gives them with the predictor: --predictor svd-taylor:order=2.
PARAMETERS: dict[str, tuple[str, ...]] = {
    "svd-taylor": ("order", "gamma"),
    "ema-velocity": ("beta", "gamma"),
    "ema": ("beta", "gamma"),
    "reuse": ("gamma",),
    "svd-fitted": (),
}


def _needs_weights() -> Predictor:
    raise SvdExportError("predictor svd-fitted takes its weights from an engine's plan statistics and plan "
                         "(engine.generate, engine.step_cache)")


def make_predictor(name: str, beta: float = 0.9, order: int = 1,
                   weights: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Predictor:
    """A fresh predictor, already reset; an unknown name is the user's one-line error. `weights` are a
    fitted predictor's (a, b) per cached step."""
    if name not in PREDICTORS:
        raise SvdExportError(f"unknown predictor {name!r} (choose from {', '.join(PREDICTORS)})")
    predictor = Fitted(weights) if name in FITTED and weights is not None else PREDICTORS[name](beta, order)
    predictor.reset()
    return predictor


def damped_taylor(last: torch.Tensor, last_step: int, prev: torch.Tensor | None, prev_step: int | None,
                  step: int, gamma: float) -> torch.Tensor:
    """R^ = R_j + gamma (i - j) (R_j - R_k) / (j - k): an order-1 Taylor step shrunk by gamma.

    gamma = 0 (or no earlier full step) returns `last` itself, so it equals residual reuse exactly. The
    branch is on a Python float fixed per request, never on tensor values.
    """
    if gamma == 0.0 or prev is None:
        return last
    return last + (gamma * (step - last_step) / (last_step - prev_step)) * (last - prev)


class ResidualForecast:
    """The residual R on cached steps: damped Taylor from the last two full steps (gamma 0: reuse).

    The cached-step graph takes the residuals as an input, so this only changes that tensor per step.
    """

    def __init__(self, gamma: float):
        self.gamma = gamma
        self.reset()

    def reset(self) -> None:
        self.last: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.last_step, self.prev_step = 0, None

    def update(self, step: int, residuals: torch.Tensor) -> None:
        self.prev, self.prev_step = self.last, (self.last_step if self.last is not None else None)
        self.last, self.last_step = residuals, step

    def predict(self, step: int) -> torch.Tensor:
        return damped_taylor(self.last, self.last_step, self.prev, self.prev_step, step, self.gamma)
