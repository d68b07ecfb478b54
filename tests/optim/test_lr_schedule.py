import math

import pytest

from gptrain.optim.schedule import learning_rate

ARGS = dict(max_lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000)


def test_warmup_is_linear_from_a_nonzero_value():
    assert learning_rate(0, **ARGS) == pytest.approx(1e-3 * 1 / 101)
    assert learning_rate(49, **ARGS) == pytest.approx(1e-3 * 50 / 101)
    assert learning_rate(99, **ARGS) == pytest.approx(1e-3 * 100 / 101)


def test_cosine_decay_values_computed_by_hand():
    assert learning_rate(100, **ARGS) == pytest.approx(1e-3)  # decay starts at the peak
    # Halfway through the decay (iter 1050) cos(pi/2) = 0: exactly the midpoint of max and min.
    assert learning_rate(1050, **ARGS) == pytest.approx(5.5e-4)
    # A quarter of the way (iter 575): 1e-4 + 0.5 * (1 + cos(pi/4)) * 9e-4.
    assert learning_rate(575, **ARGS) == pytest.approx(1e-4 + 0.5 * (1 + math.sqrt(0.5)) * 9e-4)


def test_constant_min_lr_after_decay_and_flat_when_disabled():
    assert learning_rate(2000, **ARGS) == pytest.approx(1e-4)
    assert learning_rate(5000, **ARGS) == pytest.approx(1e-4)
    assert learning_rate(0, **ARGS, decay=False) == 1e-3
    assert learning_rate(1500, **ARGS, decay=False) == 1e-3


def test_schedule_never_increases_after_warmup():
    values = [learning_rate(i, **ARGS) for i in range(100, 2100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
