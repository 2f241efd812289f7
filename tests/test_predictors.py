import pytest
import torch

from svdexport.cache.predictors import FITTED, PREDICTORS, make_predictor
from svdexport.errors import SvdExportError


def feed(predictor, steps, fn):
    for s in steps:
        predictor.update(s, fn(s))


def linear(s):
    return torch.tensor([1.0, -2.0]) + s * torch.tensor([0.5, 3.0])


def quadratic(s):
    return torch.tensor([1.0, -2.0]) + s * torch.tensor([0.5, 3.0]) + s * s * torch.tensor([-0.25, 0.125])


# Full steps as the FLUX plan makes them: warmup 0,1,2 then every 7 (uneven spacing).
FULL = [0, 1, 2, 8, 15]


@pytest.mark.parametrize("name,kw", [("ema-velocity", {"beta": 0.0}), ("svd-taylor", {"order": 1}),
                                     ("svd-taylor", {"order": 2})])
def test_exact_on_linear_trajectory(name, kw):
    p = make_predictor(name, **kw)
    feed(p, FULL, linear)
    for step in range(16, 22):
        assert torch.allclose(p.predict(step), linear(step), atol=1e-5)


def test_order_two_exact_on_quadratic_with_uneven_spacing():
    p = make_predictor("svd-taylor", order=2)
    feed(p, FULL, quadratic)
    for step in range(16, 22):
        assert torch.allclose(p.predict(step), quadratic(step), atol=1e-4)
    # Order 1 is not exact there: the test above can fail.
    p1 = make_predictor("svd-taylor", order=1)
    feed(p1, FULL, quadratic)
    assert not torch.allclose(p1.predict(20), quadratic(20), atol=1e-2)


def test_ema_is_the_papers_rule_held_between_full_steps():
    p = make_predictor("ema", beta=0.9)
    p.update(0, torch.tensor([1.0]))
    assert p.predict(1) == 1.0  # C_ema = C on the first full step
    p.update(3, torch.tensor([2.0]))
    expected = 0.9 * 1.0 + 0.1 * 2.0
    assert torch.allclose(p.predict(4), torch.tensor([expected]))
    assert torch.allclose(p.predict(9), torch.tensor([expected]))  # held, not extrapolated


def test_ema_velocity_smooths_the_velocity():
    p = make_predictor("ema-velocity", beta=0.5)
    p.update(0, torch.tensor([0.0]))
    assert p.predict(2) == 0.0  # one point: no velocity yet
    p.update(1, torch.tensor([1.0]))  # v = 1
    p.update(3, torch.tensor([7.0]))  # v = 3 -> ema 0.5*1 + 0.5*3 = 2
    assert torch.allclose(p.predict(5), torch.tensor([7.0 + 2 * 2.0]))


def test_reuse_returns_last_full_step():
    p = make_predictor("reuse")
    feed(p, FULL, linear)
    assert torch.equal(p.predict(20), linear(15))


def test_fresh_predictor_has_no_state():
    p = make_predictor("svd-taylor", order=2)
    feed(p, FULL, quadratic)
    p.reset()
    p.update(0, torch.tensor([5.0, 5.0]))
    assert torch.equal(p.predict(3), torch.tensor([5.0, 5.0]))


def test_unknown_predictor_is_the_users_error_naming_the_choices():
    with pytest.raises(SvdExportError, match="unknown predictor 'nope' .*svd-taylor, ema-velocity, ema, reuse"):
        make_predictor("nope")


def test_every_registered_predictor_is_a_fresh_object_exact_on_a_constant():
    # One registry: every name builds, starts without state, and forecasts a constant trajectory exactly
    # (a property every forecast rule must have; a predictor returning garbage or sharing state fails it).
    for name in set(PREDICTORS) - set(FITTED):  # fitted ones take their weights from a plan: test_fitted.py
        a, b = make_predictor(name), make_predictor(name)
        assert a is not b
        for s in FULL:
            a.update(s, torch.tensor([2.0, -1.0]))
        assert torch.allclose(a.predict(20), torch.tensor([2.0, -1.0])), name
