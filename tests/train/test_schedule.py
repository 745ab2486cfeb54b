"""cosine_schedule: exact values at the landmarks, shape, monotonicity, errors."""

import math

import numpy as np
import pytest

from retain_asd.train.schedule import cosine_schedule


def test_landmarks_exact():
    # 10 warm-up steps, 21 decay steps (index 10..30): p = (s - 10) / 20.
    lr = cosine_schedule(base_lr=1e-4, total_steps=31, warmup_steps=10, min_lr=1e-6)
    assert lr.shape == (31,) and lr.dtype == np.float64
    assert lr[0] == 0.0
    assert lr[5] == 1e-4 * 5 / 10  # halfway through warm-up
    assert lr[9] == 1e-4 * 9 / 10  # last warm-up step
    assert lr[10] == 1e-4  # warm-up end: cos(0) = 1
    assert lr[20] == pytest.approx((1e-4 + 1e-6) / 2, rel=1e-15)  # midpoint: cos(pi / 2) = 0
    assert lr[30] == 1e-6  # end: cos(pi) = -1
    # Quarter of the decay: min + (base - min) (1 + cos(pi / 4)) / 2.
    assert lr[15] == pytest.approx(1e-6 + (1e-4 - 1e-6) * (1 + math.sqrt(0.5)) / 2, rel=1e-14)


def test_paper_schedule_shape_and_monotone():
    lr = cosine_schedule(1e-4, total_steps=20_000, warmup_steps=200)
    assert lr.shape == (20_000,)
    assert np.all(np.diff(lr[:201]) > 0) and np.all(np.diff(lr[200:]) <= 0)
    assert lr.max() == 1e-4 and lr[200] == 1e-4 and lr[-1] == 0.0


def test_edge_cases():
    assert cosine_schedule(1.0, 3, 0).tolist() == [1.0, 0.5, 0.0]  # no warm-up
    assert cosine_schedule(1.0, 4, 4).tolist() == [0.0, 0.25, 0.5, 0.75]  # warm-up only
    assert cosine_schedule(1.0, 3, 2).tolist() == [0.0, 0.5, 1.0]  # one decay step stays at base_lr


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(base_lr=1e-4, total_steps=10, warmup_steps=11), "warmup_steps"),
        (dict(base_lr=1e-4, total_steps=10, warmup_steps=-1), "warmup_steps"),
        (dict(base_lr=1e-4, total_steps=0, warmup_steps=0), "total_steps"),
        (dict(base_lr=1e-4, total_steps=10.0, warmup_steps=0), "total_steps"),
        (dict(base_lr=0.0, total_steps=10, warmup_steps=0), "base_lr"),
        (dict(base_lr=1e-4, total_steps=10, warmup_steps=0, min_lr=1e-3), "min_lr"),
        (dict(base_lr=1e-4, total_steps=10, warmup_steps=0, min_lr=-1.0), "min_lr"),
    ],
)
def test_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        cosine_schedule(**kwargs)
