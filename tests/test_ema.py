"""ExponentialMovingAverage (models/ema.py): closed forms, warm-up, swapping, checkpoints."""
import io

import pytest
import torch
from torch import nn

from models import ExponentialMovingAverage


def make_model(seed=0, hidden=4, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2)).to(dtype)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def set_params(model, values):
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(values, model.parameters())


def test_constant_parameters_closed_form():
    """With the parameters held at c after the start s_0: s_k = d^k s_0 + (1 - d^k) c."""
    model, d, k = make_model(), 0.9, 25
    ema = ExponentialMovingAverage(model, decay=d)
    s0 = flat(model.parameters()).clone()
    c = torch.randn(s0.shape, generator=torch.Generator().manual_seed(5), dtype=s0.dtype)
    set_params(model, c)
    for _ in range(k):
        ema.update(model)
    expected = d ** k * s0 + (1 - d ** k) * c
    assert (flat(ema.shadow) - expected).abs().max() < 1e-12
    assert ema.num_updates == k


@pytest.mark.parametrize("warmup", [False, True])
def test_known_sequence_geometric_weights(warmup):
    """s_k = (prod_i d_i) s_0 + sum_i (1 - d_i) (prod_{j > i} d_j) p_i, with d_i = d without
    warm-up (the geometric weighting (1 - d) d^(k - i)) and min(d, (1 + i) / (10 + i)) with."""
    model, d, k = make_model(1), 0.95, 30
    ema = ExponentialMovingAverage(model, decay=d, warmup=warmup)
    g = torch.Generator().manual_seed(0)
    s0 = flat(model.parameters()).clone()
    ps = [torch.randn(s0.shape, generator=g, dtype=torch.float64) for _ in range(k)]
    for p in ps:
        set_params(model, p)
        ema.update(model)
    ds = [min(d, (1 + i) / (10 + i)) if warmup else d for i in range(1, k + 1)]
    expected = torch.zeros_like(s0)
    weight_s0 = 1.0
    for i, (p, di) in enumerate(zip(ps, ds)):
        tail = 1.0
        for dj in ds[i + 1:]:
            tail *= dj
        expected += (1 - di) * tail * p
        weight_s0 *= di
    expected += weight_s0 * s0
    assert (flat(ema.shadow) - expected).abs().max() < 1e-12
    if not warmup:  # the weights sum to 1: (1 - d) sum_{i<k} d^i + d^k
        assert abs(sum((1 - d) * d ** (k - i) for i in range(1, k + 1)) + d ** k - 1) < 1e-12


def test_warmup_schedule_values():
    ema = ExponentialMovingAverage(make_model(), decay=0.999, warmup=True)
    assert ema.decay_for(1) == pytest.approx(2 / 11, abs=1e-15)
    assert ema.decay_for(2) == pytest.approx(3 / 12, abs=1e-15)
    assert ema.decay_for(100) == pytest.approx(101 / 110, abs=1e-15)
    # (1 + n) / (10 + n) reaches 0.999 at n = 8990
    assert ema.decay_for(8989) < 0.999 and ema.decay_for(8991) == 0.999
    assert ExponentialMovingAverage(make_model(), decay=0.999).decay_for(1) == 0.999
    # the first update really uses 2/11: from s_0 = 0 to parameters 1, s_1 = 9/11
    model = make_model()
    set_params(model, torch.zeros_like(flat(model.parameters())))
    ema = ExponentialMovingAverage(model, decay=0.999, warmup=True)
    set_params(model, torch.ones_like(flat(model.parameters())))
    ema.update(model)
    assert (flat(ema.shadow) - 9 / 11).abs().max() < 1e-15


def test_buffers_are_copied_not_averaged():
    model = make_model()
    ema = ExponentialMovingAverage(model, decay=0.5)
    model.train()
    model(torch.randn(8, 3, dtype=torch.float64) + 3.0)  # moves the BatchNorm statistics
    ema.update(model)
    names = dict(model.named_buffers())
    for name, b in zip(ema.buffer_names, ema.buffers):
        assert torch.equal(b, names[name]), name
    assert ema.buffer_names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_store_copy_to_restore_is_exact():
    model = make_model(2)
    ema = ExponentialMovingAverage(model, decay=0.7)
    for step in range(5):
        set_params(model, torch.randn_like(flat(model.parameters())))
        model.train()
        model(torch.randn(4, 3, dtype=torch.float64))
        ema.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.store(model)
    ema.copy_to(model)
    assert torch.equal(flat(model.parameters()), flat(ema.shadow))
    assert not torch.equal(flat(model.parameters()), flat(before[k] for k in
                                                        dict(model.named_parameters())))
    ema.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)
    with pytest.raises(ZeroDivisionError):
        with ema.average_parameters(model):
            assert torch.equal(flat(model.parameters()), flat(ema.shadow))
            1 / 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_parameter_iterables_and_float32():
    model = make_model(dtype=torch.float32)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.5)
    assert all(s.dtype == torch.float32 for s in ema.shadow) and not ema.buffers
    s0 = flat(model.parameters()).clone()
    set_params(model, torch.zeros_like(s0))
    ema.update(model.parameters())
    torch.testing.assert_close(flat(ema.shadow), 0.5 * s0)
    ema.copy_to(model.parameters())
    torch.testing.assert_close(flat(model.parameters()), 0.5 * s0)


def test_state_dict_round_trip_gives_identical_updates():
    model = make_model(3)
    ema = ExponentialMovingAverage(model, decay=0.99, warmup=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        set_params(model, torch.randn(flat(model.parameters()).shape, generator=g,
                                      dtype=torch.float64))
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = ExponentialMovingAverage(make_model(4), decay=0.5)  # other init, decay, no warm-up
    fresh.load_state_dict(state)
    assert (fresh.decay, fresh.warmup, fresh.num_updates) == (0.99, True, 7)
    for _ in range(5):
        set_params(model, torch.randn(flat(model.parameters()).shape, generator=g,
                                      dtype=torch.float64))
        ema.update(model)
        fresh.update(model)
        assert torch.equal(flat(fresh.shadow), flat(ema.shadow))
    assert fresh.num_updates == ema.num_updates == 12


def test_refuses_state_dict_of_another_model():
    state = ExponentialMovingAverage(make_model(hidden=5)).state_dict()
    ema = ExponentialMovingAverage(make_model(hidden=4))
    shadow0 = flat(ema.shadow).clone()
    with pytest.raises(ValueError, match=r"'0\.weight'.*\(5, 3\).*\(4, 3\)"):
        ema.load_state_dict(state)
    assert torch.equal(flat(ema.shadow), shadow0)  # nothing was half-loaded
    other = ExponentialMovingAverage(nn.Sequential(nn.Linear(3, 4))).state_dict()
    with pytest.raises(ValueError, match=r"no parameter '1\.weight'"):
        ema.load_state_dict(other)
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Sequential(nn.Linear(3, 4)))
