"""The contract every registered sampler must keep (samplers.SAMPLERS), run over every entry,
the way diffusers runs its common tests over every scheduler: shapes, dtype and device; an
honest NFE count (counted at the score function); seeds; the callback payload; bad options
refused with a ValueError naming the option before any score evaluation; and accuracy on the
exact score at the sampler's default budget.

A new sampler gets all of this by adding its registry line; ``DEFAULT_BUDGET_BOUNDS`` then
needs its measured accuracy.
"""
from __future__ import annotations

import math

import pytest
import torch

import samplers
import sde_lib
from testbed import SDES, frechet_distance, reference_and_floor, spread_gaussian

F64 = torch.float64
NAMES = list(samplers.SAMPLERS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PAYLOAD_KEYS = {"step", "t", "sigma", "x", "denoised"}


def small_sde(name: str) -> sde_lib.SDE:
    """A cheap SDE the sampler supports: annealed Langevin needs VE noise levels; the others
    run on VP with 50 levels (pc steps over all of them)."""
    if name == "ald":
        return sde_lib.VESDE(0.01, 1.0, N=10)
    return sde_lib.VPSDE(N=50)


def quick_options(name: str) -> dict:
    """Options that keep the generic checks fast (few steps); accuracy is checked separately
    at the defaults."""
    return {"ald": {"n_steps_each": 3}, "ode": {"method": "rk4", "num_steps": 4},
            "ddim": {"num_steps": 4}, "dpm_solver": {"num_steps": 4}, "edm": {"num_steps": 4},
            "dpm_adaptive": {"rtol": 0.2}}.get(name, {})


class Counter:
    """The exact score of a small Gaussian, counting its (batched) calls."""

    def __init__(self, sde, dim: int = 3):
        self.exact = spread_gaussian(dim, seed=2, std_min=0.2, std_max=0.8).score_fn(sde)
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],) and t.device == x.device
        return self.exact(x, t)


def run(name, *, shape=(5, 3), seed=0, device="cpu", dtype=None, callback=None, **options):
    sde = small_sde(name)
    score = Counter(sde, shape[-1])
    generator = torch.Generator(device=device).manual_seed(seed)
    result = samplers.SAMPLERS[name](score, sde, shape, generator=generator, device=device,
                                     dtype=dtype, callback=callback,
                                     **{**quick_options(name), **options})
    return result, score


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [None, F64])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_device_and_honest_nfe(name, dtype, device):
    result, score = run(name, device=device, dtype=dtype)
    assert isinstance(result, samplers.SampleResult)
    assert result.x.shape == (5, 3) and result.x.device.type == device
    assert result.x.dtype == (dtype or torch.get_default_dtype())
    assert torch.isfinite(result.x).all()
    assert result.nfe == score.calls > 0


@pytest.mark.parametrize("name", NAMES)
def test_image_shaped_data(name):
    """(B, C, H, W) states work like flat ones (per-sample scalars broadcast by append_dims)."""
    sde = small_sde(name)
    exact = spread_gaussian(8, seed=4, std_min=0.2, std_max=0.8, event_shape=(2, 2, 2))
    result = samplers.SAMPLERS[name](exact.score_fn(sde), sde, (3, 2, 2, 2),
                                     generator=torch.Generator().manual_seed(0),
                                     **quick_options(name))
    assert result.x.shape == (3, 2, 2, 2) and torch.isfinite(result.x).all()


@pytest.mark.parametrize("name", NAMES)
def test_a_seed_gives_the_same_samples(name):
    a, _ = run(name, seed=3)
    b, _ = run(name, seed=3)
    c, _ = run(name, seed=4)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("name", NAMES)
def test_x_init_replaces_the_prior_draw(name):
    """A seeded run equals a run started from that seed's prior draw, for the deterministic
    samplers (the stochastic ones draw their noise from the same generator afterwards)."""
    sde = small_sde(name)
    x_T = sde.prior_sampling((5, 3), generator=torch.Generator().manual_seed(6))
    a, _ = run(name, seed=6)
    score = Counter(sde)
    b = samplers.SAMPLERS[name](score, sde, (5, 3), x_init=x_T.clone(),
                                generator=torch.Generator().manual_seed(6),
                                **quick_options(name))
    if name in ("ode", "ddim", "dpm_solver", "edm", "dpm_adaptive", "unipc", "ipndm"):
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert b.nfe == score.calls


@pytest.mark.parametrize("name", NAMES)
def test_callback_payload(name):
    """One payload for every sampler: {step, t, sigma, x, denoised}; t and sigma are floats
    in [0, T] and [0, inf), x and denoised are shaped like the samples."""
    seen = []
    result, _ = run(name, callback=seen.append)
    assert seen, "the callback was never called"
    for payload in seen:
        assert set(payload) == PAYLOAD_KEYS
        assert isinstance(payload["step"], int)
        assert isinstance(payload["t"], float) and 0.0 <= payload["t"] <= 1.0
        assert isinstance(payload["sigma"], float) and payload["sigma"] >= 0.0
        assert payload["x"].shape == result.x.shape
        assert payload["denoised"].shape == result.x.shape
        assert torch.isfinite(payload["denoised"]).all()


def _bad_values(default):
    """Values of the wrong kind or out of range for an option with this default."""
    if isinstance(default, bool):
        return ["yes", 1]
    if isinstance(default, int):
        return [-7, 2.5, "x", True]
    if isinstance(default, float):
        return [math.nan, -1e9, "x"]
    if isinstance(default, str):
        return ["no_such_choice", 3]
    return ["x", -3]                        # None: an optional integer (ode.num_steps)


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_raise_a_value_error_naming_the_option(name):
    sampler = samplers.SAMPLERS[name]
    for option, default in sampler.defaults.items():
        for value in _bad_values(default):
            sde = small_sde(name)
            score = Counter(sde)
            with pytest.raises(ValueError, match=option) as info:
                sampler(score, sde, (2, 3), **{option: value})
            assert score.calls == 0, f"{name}.{option}={value!r} was refused only after sampling"
            assert "\n" not in str(info.value)
            with pytest.raises(ValueError, match=option):
                sampler.options(sde, {option: value})


def test_registry_options_name_unknown_options_and_keep_defaults():
    for name, sampler in samplers.SAMPLERS.items():
        sde = small_sde(name)
        assert sampler.options(sde) == sampler.defaults
        with pytest.raises(ValueError, match="unknown option 'snr_typo'.*valid options"):
            sampler.options(sde, {"snr_typo": 1})


# ----- accuracy at the default budget -----------------------------------------------------
#: FD to a true sample set / the floor of two true sets (n = 2000, 16-D spread Gaussian,
#: stds 0.05-1.0), measured with the registry defaults (pc: N = 1000 levels; ald: NCSN's
#: 10 levels 1 -> 0.01, 100 steps each), for VP / sub-VP / VE:
#:   pc 0.96 / 0.76 / 0.74, ald (VE) 1.18, ode 1.20 / 1.20 / 1.10, ddim 2.91 / 2.91 / 1.94,
#:   dpm_solver 1.39 / 1.39 / 1.20, edm 2.66 / 2.66 / 1.48, dpm_adaptive 1.05 / 1.06 / 0.99,
#:   unipc 1.30 / 1.30 / 1.14, ipndm 1.30 / 1.30 / 1.16 (few-step grids ending at the default
#:   sigma_min = 0.02; ipndm order 3, Karras steps on VE; with the old end t = eps: ddim
#:   3.22 / 6.32 / 2.19, dpm_solver 1.43 / 1.74 / 1.23, edm 2.87 / 4.02 / 1.56, unipc
#:   1.33 / 1.65 / 1.16, ipndm (then order 4 on log-SNR steps) 1.38 / 1.69 / 1.19).
#: DDIM is first order and EDM's Heun takes its 18 levels on a grid made for VE, so at their
#: default 20 / 18 steps they sit several times above the floor; a broken update would give
#: FD of order 1 (100x the floor). Bounds: ~1.5x the worst measured ratio.
DEFAULT_BUDGET_BOUNDS = {"pc": 1.5, "ald": 1.8, "ode": 1.8, "ddim": 9.5, "dpm_solver": 2.6,
                         "edm": 6.0, "dpm_adaptive": 1.6, "unipc": 2.5, "ipndm": 2.5,
                         "respaced": 4.9}
#: respaced (50 of the 1000 levels, variance beta~; VP / VE, sub-VP has no chain): 3.21 / 1.82.
#: The SDEs a sampler's accuracy is checked on: all three, but annealed Langevin needs VE
#: noise levels and respacing needs a discrete chain.
ACCURACY_SDES = {"ald": ["ve"], "respaced": ["vp", "ve"]}


@pytest.fixture(scope="module")
def gaussian16():
    dist = spread_gaussian(16, seed=5, std_min=0.05, std_max=1.0)
    return (dist, *reference_and_floor(dist, 2000))


def _accuracy_cases():
    for name in NAMES:
        for sde_name in ACCURACY_SDES.get(name, ["vp", "subvp", "ve"]):
            yield pytest.param(name, sde_name, id=f"{name}-{sde_name}")


@pytest.mark.parametrize("name, sde_name", list(_accuracy_cases()))
def test_exact_score_accuracy_at_the_default_budget(gaussian16, name, sde_name):
    dist, reference, floor = gaussian16
    sde = sde_lib.VESDE(0.01, 1.0, N=10) if name == "ald" else SDES[sde_name]()
    result = samplers.SAMPLERS[name](dist.score_fn(sde), sde, (2000, 16), dtype=F64,
                                     generator=torch.Generator().manual_seed(3))
    ratio = frechet_distance(result.x, reference) / floor
    assert ratio < DEFAULT_BUDGET_BOUNDS[name], (name, sde_name, ratio)
