"""SVD-Cache math: bases from calibration, principal/residual split, predictors and the step plan."""

from svdexport.cache.config import CacheConfig
from svdexport.cache.plan import StepPlan
from svdexport.cache.predictors import PREDICTORS, make_predictor
from svdexport.cache.svd import Bases, GramAccumulator, rank_for_energy

__all__ = ["CacheConfig", "StepPlan", "PREDICTORS", "make_predictor", "Bases", "GramAccumulator", "rank_for_energy"]
