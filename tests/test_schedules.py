"""Tests for mpdit.training.schedules: constant and EDM2 learning-rate schedules."""

import math
import pickle

import pytest
import torch

from mpdit.errors import MPDiTError
from mpdit.training.schedules import EDM2, Constant, make_schedule, set_lr


def test_constant_without_and_with_warmup():
    s = make_schedule("constant", 1e-4)
    assert [s(k) for k in (0, 1, 10**6)] == [1e-4] * 3
    w = make_schedule("constant", 1e-3, warmup_steps=4)
    assert [w(k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_edm2_warmup_then_inverse_sqrt():
    s = make_schedule("edm2", 1e-2, warmup_steps=10, t_ref=100)
    assert s(0) == pytest.approx(1e-3)  # first step is not wasted at lr 0
    assert s(9) == pytest.approx(1e-2)
    assert s(50) == pytest.approx(1e-2)
    assert s(100) == pytest.approx(1e-2)
    for step in (101, 400, 10_000):
        assert s(step) == pytest.approx(1e-2 / math.sqrt(step / 100))
    assert s(400) == pytest.approx(5e-3)
    # warm-up longer than t_ref: both factors multiply
    s2 = EDM2(1.0, t_ref=10, warmup_steps=40)
    assert s2(19) == pytest.approx(0.5 / math.sqrt(1.9))


def test_lambda_lr_multiplier_matches_absolute_lr():
    s = make_schedule("edm2", 1e-2, warmup_steps=3, t_ref=5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.multiplier)
    seen = []
    for step in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([s(k) for k in range(12)])
    set_lr(opt, 0.123)
    assert opt.param_groups[0]["lr"] == 0.123


def test_schedule_errors_and_pickling():
    with pytest.raises(MPDiTError, match="unknown learning-rate schedule 'cosine'"):
        make_schedule("cosine", 1e-3)
    with pytest.raises(MPDiTError, match="t_ref > 0"):
        make_schedule("edm2", 1e-3, warmup_steps=10)
    with pytest.raises(MPDiTError, match="positive"):
        Constant(0.0)
    with pytest.raises(MPDiTError, match="warmup_steps"):
        Constant(1e-3, warmup_steps=-1)
    with pytest.raises(MPDiTError, match="step must be >= 0"):
        Constant(1e-3)(-1)
    s = make_schedule("edm2", 1e-2, 5, 50)
    assert pickle.loads(pickle.dumps(s))(123) == s(123)
