import math

import pytest

from gptrain.optim.schedule import LrSchedule

# A peak of 1e-3 and a floor of 1e-4 (min_ratio 0.1), warmup 100, decay to iteration 2000.
PEAK = 1e-3
SCHEDULE = LrSchedule(warmup_iters=100, decay_iters=2000, min_ratio=0.1)


def lr(it: int, schedule: LrSchedule = SCHEDULE) -> float:
    return PEAK * schedule.factor(it)


def test_warmup_is_linear_from_a_nonzero_value():
    assert lr(0) == pytest.approx(1e-3 * 1 / 101)
    assert lr(49) == pytest.approx(1e-3 * 50 / 101)
    assert lr(99) == pytest.approx(1e-3 * 100 / 101)


def test_cosine_decay_values_computed_by_hand():
    assert lr(100) == pytest.approx(1e-3)  # decay starts at the peak
    # Halfway through the decay (iter 1050) cos(pi/2) = 0: exactly the midpoint of max and min.
    assert lr(1050) == pytest.approx(5.5e-4)
    # A quarter of the way (iter 575): 1e-4 + 0.5 * (1 + cos(pi/4)) * 9e-4.
    assert lr(575) == pytest.approx(1e-4 + 0.5 * (1 + math.sqrt(0.5)) * 9e-4)


def test_constant_min_lr_after_decay_and_flat_when_disabled():
    assert lr(2000) == pytest.approx(1e-4)
    assert lr(5000) == pytest.approx(1e-4)
    flat = LrSchedule(100, 2000, 0.1, decay=False)
    assert lr(0, flat) == lr(1500, flat) == 1e-3
    assert flat.phase(0) == flat.phase(1500) == "constant"


def test_schedule_never_increases_after_warmup():
    values = [lr(i) for i in range(100, 2100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_wsd_by_hand():
    linear = LrSchedule(100, 2000, 0.1, shape="linear")
    assert lr(1050, linear) == pytest.approx(5.5e-4)  # halfway: the midpoint, as cosine
    assert lr(575, linear) == pytest.approx(1e-3 - 9e-4 * 0.25)
    wsd = LrSchedule(100, 2000, 0.1, shape="wsd", decay_fraction=0.2)  # decays over iterations 1600..2000
    assert wsd.decay_start == 1600 and wsd.phase(1599) == "stable" and wsd.phase(1600) == "decay"
    assert lr(1599, wsd) == 1e-3 and lr(1800, wsd) == pytest.approx(5.5e-4)
    assert [wsd.phase(it) for it in (0, 99, 100, 2000)] == ["warmup", "warmup", "stable", "floor"]
