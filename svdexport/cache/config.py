"""Cache settings: the bases, the forecast and the kind of step plan (cache/plan.py makes the plans)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from svdexport.cache.predictors import PREDICTORS
from svdexport.errors import SvdExportError

GRANULARITIES = ("block", "final")
PLAN_KINDS = ("calibrated", "uniform")


@dataclass
class CacheConfig:
    granularity: str = "final"  # "final": last hidden state only; "block": per-module sites inside every block
    # How cached steps forecast the feature: "svd-fitted" (weights fitted per step on the calibration
    # trajectories, principal part and residual apart: cache/fitted.py) or a rule (svd-taylor, ema, ...).
    predictor: str = "svd-fitted"
    beta: float = 0.9  # EMA weight on the old value (ema, ema-velocity)
    order: int = 1  # finite-difference order of svd-taylor (1 or 2)
    tau: float = 0.95  # energy fraction the kept principal directions must reach
    k_max: int = 64  # cap on the rank per site; bases are zero-padded to this many columns
    warmup: int | None = 3  # first steps that are always full (None: the model's default)
    interval: int | None = 7  # after warmup, one full step every `interval` steps (None: the model's default)
    # Which steps run in full: "calibrated" (chosen at build to minimise the forecast error on the calibration
    # trajectories, see cache/plan.py) or "uniform" (warmup, then every `interval`). Either way a static list.
    # Manifests of 0.4.0 name it `plan`.
    plan_kind: str = field(default="calibrated", metadata={"formerly": "plan"})
    full_steps: int | None = None  # full steps of a calibrated plan (None: as many as the uniform plan has)
    gamma: float = 1.0  # rule predictors' residual: Taylor step damped by gamma (0: reuse it, as the paper)

    def validate(self) -> "CacheConfig":
        if self.granularity not in GRANULARITIES:
            raise SvdExportError(f"unknown granularity {self.granularity!r} (choose from {', '.join(GRANULARITIES)})")
        if self.predictor not in PREDICTORS:
            raise SvdExportError(f"unknown predictor {self.predictor!r} (choose from {', '.join(PREDICTORS)})")
        if not 0.0 < self.tau <= 1.0:
            raise SvdExportError(f"tau must be in (0, 1], got {self.tau}")
        if not 0.0 <= self.beta < 1.0:
            raise SvdExportError(f"beta must be in [0, 1), got {self.beta}")
        if self.order not in (1, 2):
            raise SvdExportError(f"order must be 1 or 2, got {self.order}")
        # None: the model's default, filled in by the build (e.g. FLUX.1-dev 3/7, schnell 1/2).
        if self.interval is not None and self.interval < 1:
            raise SvdExportError(f"interval must be >= 1, got {self.interval}")
        if self.warmup is not None and self.warmup < 0:
            raise SvdExportError(f"warmup must be >= 0, got {self.warmup}")
        if self.plan_kind not in PLAN_KINDS:
            raise SvdExportError(f"unknown plan {self.plan_kind!r} (choose from {', '.join(PLAN_KINDS)})")
        if self.full_steps is not None and self.full_steps < 1:
            raise SvdExportError(f"full_steps must be >= 1, got {self.full_steps}")
        if not 0.0 <= self.gamma <= 1.0:
            raise SvdExportError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.k_max < 1:
            raise SvdExportError(f"k_max must be >= 1, got {self.k_max}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

