"""Sampler and likelihood benchmark on exact scores (a benchmark, not a test).

    python bench/samplers.py [--quick] [--samples N] [--mixture-samples N]
                             [--problems gauss64,mixture2d] [--device cpu|cuda] [--out results.json]

Every sampler runs on the *exact* score of ``sde_lib.spread_gaussian(64)`` (stds 0.02..1.5
along a random rotation; "gauss64") and of ``sde_lib.eight_mode_mixture()`` (8 modes of std
0.15 on a circle of radius 2, weights 1..8 / 36; "mixture2d"), so what is measured is the
sampler alone. On the mixture the quality measures are the FD, the total variation between
the nearest-mode frequencies and the weights ("mode TV") and the fraction of samples
stranded off every mode ("off-mode", see ``MixtureReference``). Per sampler and SDE it
prints the score evaluations (NFE), the wall time, the Frechet distance (FD) of the samples
to an independent true sample set, the same FD in the data's whitened coordinates (where the
low-variance directions count as much as the large ones), and the sampler's own overhead:
the time per step and per NFE with a trivial score (the exact score of N(0, I) data, a few
elementwise ops), i.e. the cost of the loop, not of the model. The floors are the FDs
between two independent true sample sets of the same size.

Two sections per problem and SDE: our samplers in their standard setting (N = 1000 steps;
--quick: 100), and every sampler at matched NFE budgets (5, 10, 20, 50, 100; --quick: 5, 10,
20), then a summary of the best of ours vs the best of k-diffusion at <= 20 NFE. If
k-diffusion is installed (``bash bench/setup_env.sh``; bench/README.md) its samplers run on the same exact score,
through the adapter ``KDiffusionDenoiser`` below, with Karras sigmas, and its
``log_likelihood`` is compared with ours against the true log-density.

Settings: VPSDE(), subVPSDE(), VESDE(sigma_min=0.01, sigma_max=20): sigma_max=20 rather than 5
because the prior N(0, sigma_max^2 I) differs from the true p_T, and with sigma_max=5 that
alone puts a probability-flow sampler at FD 0.067 from the data (computed in closed form),
not far below the 2000-sample floor of 0.11; with 20 it is 0.004. Sampling state in --dtype
(float32 by default; GaussianMixture computes the score in float64), likelihoods in float64.
One torch thread by default (--threads): on the shared 2-core machine two threads made a
score evaluation 50x slower.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout, uninstalled

import samplers  # noqa: E402
import sde_lib  # noqa: E402
from samplers.harness import CountingScore  # noqa: E402
from samplers.metrics import frechet_distance  # noqa: E402
from sde_lib import SCHEDULE_DTYPE, append_dims  # noqa: E402

from samplers import ddim_sample, dpm_solver_sample, log_likelihood, ode_sample  # noqa: E402

F64 = torch.float64
DIM = 64
SAMPLE_EPS = 1e-3          # smallest sampling time (pc_sample's default); k-diffusion: sigma(eps)
LIKELIHOOD_EPS = 1e-5      # time the data sits at for likelihoods (log_likelihood's default)
KDIFF_INSTALL = "bash bench/setup_env.sh   (then run with .venv-bench/bin/python)"

#: The exact-score problems: the 64-D spread Gaussian and the 2-D eight-mode mixture.
PROBLEMS = ("gauss64", "mixture2d")

SDES = {
    "VP": lambda N: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=N),
    "subVP": lambda N: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=N),
    "VE": lambda N: sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=N),
}


# ----- k-diffusion, without its package __init__ ----------------------------------------------
def load_k_diffusion():
    """Import ``k_diffusion.sampling`` alone and return (module, None), or (None, reason).

    k_diffusion/__init__.py imports every submodule, and those need torchvision, CLIP, wandb,
    ... . sampling.py itself needs only scipy, torchdiffeq, torchsde, tqdm and
    ``utils.append_dims``: register a stub package whose __path__ is the installed package
    directory (found without executing __init__) and a stub ``k_diffusion.utils``.
    """
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"], None
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None, f"k-diffusion is not installed; to add it: {KDIFF_INSTALL}"
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = append_dims          # the one helper sampling.py uses from utils
    package.utils = utils
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        return importlib.import_module("k_diffusion.sampling"), None
    except ImportError as error:            # e.g. torchsde missing
        for name in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling"):
            sys.modules.pop(name, None)
        return None, f"k_diffusion.sampling failed to import ({error}); to fix: {KDIFF_INSTALL}"


def sigma_of_t(sde, t: float) -> float:
    """The VE-space noise level sigma(t) = std(t) / alpha(t) = exp(-lambda(t) / 2)."""
    return math.exp(-0.5 * sde.log_snr(torch.tensor(t, dtype=F64)).item())


class KDiffusionDenoiser:
    """k-diffusion's model(x_ve, sigma) -> denoised, from our score_fn(x, t) and a linear SDE.

    Every SDE here has x_t = alpha(t) x_0 + std(t) z. Divide by alpha: x_ve = x_t / alpha =
    x_0 + sigma z with sigma = std / alpha = exp(-lambda / 2), lambda = sde.log_snr(t): the VE
    (EDM) parameterisation, in which k-diffusion works. At noise level sigma the time is
    t = sde.t_from_log_snr(-2 log sigma), and the denoiser is the posterior mean of x_0,
    the same in both parameterisations (x_ve and x_t determine each other). Tweedie's formula
    in x-space gives it from the score: E[x_0 | x_t] = (x_t + std^2 grad log p_t(x_t)) / alpha,
    evaluated at x_t = alpha x_ve. So

        D(x_ve; sigma) = (x + std(t)^2 score(x, t)) / alpha(t),   x = alpha(t) x_ve.

    It is differentiable in x_ve (for k-diffusion's log_likelihood) if the score is.
    """

    def __init__(self, score_fn: Callable, sde):
        self.score_fn, self.sde = score_fn, sde

    def __call__(self, x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        lam = -2.0 * torch.log(sigma.to(SCHEDULE_DTYPE))
        t = self.sde.t_from_log_snr(lam).clamp(0.0, self.sde.T)
        alpha, std = self.sde.marginal_coeffs(t)
        alpha = append_dims(alpha.to(x_ve.dtype), x_ve.ndim)
        var = append_dims((std ** 2).to(x_ve.dtype), x_ve.ndim)
        x = alpha * x_ve
        return (x + var * self.score_fn(x, t)) / alpha


def unit_gaussian_score(sde):
    """The trivial score for overhead timings: the exact score of N(0, I) data, -x / (alpha^2
    + std^2) (= -x for VP); stable for every SDE and sampler, unlike -x for VE."""
    def score(x, t):          # one pass over x, like the denoiser below
        alpha, std = sde.marginal_coeffs(t)
        return x * append_dims((-1.0 / (alpha ** 2 + std ** 2)).to(x.dtype), x.ndim)
    return score


def unit_gaussian_denoiser(x_ve, sigma):
    """The same for k-diffusion: the exact denoiser of N(0, I) data, x / (1 + sigma^2)."""
    return x_ve / append_dims(1.0 + sigma ** 2, x_ve.ndim)


# ----- timing ---------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


@dataclass
class Row:
    family: str            # "ours" or "k-diffusion"
    sampler: str           # the sampler and its options
    steps_label: str       # its step count, e.g. "N=1000"
    sde: str
    steps: int | None      # loop iterations (PC time steps, Langevin steps, sigma intervals)
    nfe: int | None
    wall_s: float | None
    fd: float | None
    fd_whitened: float | None    # 64-D Gaussian only
    overhead_ms_per_step: float | None
    overhead_ms_per_nfe: float | None
    budget: int | None = None    # the matched-NFE budget this run belongs to, if any
    error: str | None = None     # why the run failed (e.g. non-finite values), if it did
    problem: str = "gauss64"     # "gauss64" or "mixture2d"
    mode_tv: float | None = None     # mixture only: TV of nearest-mode frequencies vs weights
    off_mode: float | None = None    # mixture only: fraction farther than 4 std from every mode


@dataclass
class Case:
    """One sampler configuration: ``run(model, seed) -> (x, nfe)``, with model the exact
    score (ours) or denoiser (k-diffusion), or the trivial one for the overhead."""
    family: str
    sampler: str
    steps_label: str
    steps: int | None
    run: Callable
    exact_model: Callable
    trivial_model: Callable
    budget: int | None = None


def generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class Reference:
    """The independent true sample set, also in the data's whitened coordinates
    Sigma^{-1/2} (x - mu), where the FD weighs every direction alike: the plain FD is dominated
    by the few directions with std ~1 (std ranges over 0.02..1.5), and misses errors in the
    low-variance ones (the "fine detail")."""

    def __init__(self, dist, x: torch.Tensor):
        vals, vecs = torch.linalg.eigh(dist.covariance())
        self.mean, self.root_inv = dist.mean(), (vecs * vals.rsqrt()) @ vecs.T
        self.x, self.xw = x, self.whiten(x)

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        return (x.detach().cpu().to(F64).reshape(x.shape[0], -1) - self.mean) @ self.root_inv

    def scores(self, x: torch.Tensor) -> dict:
        return dict(fd=frechet_distance(x, self.x),
                    fd_whitened=frechet_distance(self.whiten(x), self.xw))


#: A sample farther than this many component stds from every mode mean is "off-mode" (for an
#: isotropic 2-D Gaussian component, P(r > 4 std) = exp(-8) = 3.4e-4).
OFF_MODE_STDS = 4.0


class MixtureReference:
    """The 2-D eight-mode mixture (``sde_lib.eight_mode_mixture``: weights 1..8 / 36, std 0.15,
    radius 2). Besides the FD to an independent true set (which sees only the first two
    moments), two mode-aware measures:

    * mode TV: assign each sample to its nearest mode mean; the total variation
      0.5 sum_k |frequency_k - weight_k| between those frequencies and the true weights
      (a sampler that drops or inflates a mode, or mixes the weights up, pays here);
    * off-mode: the fraction of samples farther than OFF_MODE_STDS = 4 stds (0.6) from every
      mode mean, i.e. stranded between modes or blurred (truth: 3.4e-4; the modes are 1.53
      apart, so a midpoint is 0.77 from both).
    """

    def __init__(self, dist, x: torch.Tensor):
        self.dist, self.x = dist, x
        self.std = dist.covs[0, 0, 0].sqrt().item()

    def mode_stats(self, x: torch.Tensor) -> tuple[float, float]:
        x = x.detach().cpu().to(F64).reshape(x.shape[0], -1)
        dists = torch.cdist(x, self.dist.means)                       # (B, 8)
        nearest, index = dists.min(dim=1)
        freq = torch.bincount(index, minlength=self.dist.means.shape[0]).to(F64) / x.shape[0]
        tv = 0.5 * (freq - self.dist.weights).abs().sum().item()
        return tv, (nearest > OFF_MODE_STDS * self.std).to(F64).mean().item()

    def scores(self, x: torch.Tensor) -> dict:
        tv, off = self.mode_stats(x)
        return dict(fd=frechet_distance(x, self.x), mode_tv=tv, off_mode=off)


def measure(case: Case, sde_name: str, reference, device, seed: int,
            problem: str = "gauss64") -> Row:
    try:
        (x, nfe), wall = timed(lambda: case.run(case.exact_model, seed), device)
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite samples")
    except (FloatingPointError, ValueError) as error:
        return Row(case.family, case.sampler, case.steps_label, sde_name, case.steps, None, None,
                   None, None, None, None, case.budget, str(error).split(";")[0], problem)
    # Overhead: the fastest of >= 3 runs (up to 20 while they take < 1 s in all) with the
    # trivial model; the minimum filters out one-off costs and other load on a shared machine.
    # Measured on the 64-D Gaussian only (the overhead table's batch).
    best, spent, repeats = math.inf, 0.0, 0
    trivial_nfe = nfe
    while problem == "gauss64" and (repeats < 3 or (repeats < 20 and spent < 1.0)):
        (_, trivial_nfe), trivial_wall = timed(lambda: case.run(case.trivial_model, seed), device)
        best, spent, repeats = min(best, trivial_wall), spent + trivial_wall, repeats + 1
    scores = reference.scores(x)
    return Row(case.family, case.sampler, case.steps_label, sde_name, case.steps, nfe, wall,
               scores["fd"], scores.get("fd_whitened"),
               None if case.steps is None or repeats == 0 else 1e3 * best / case.steps,
               None if repeats == 0 else 1e3 * best / max(trivial_nfe, 1), case.budget,
               problem=problem,
               mode_tv=scores.get("mode_tv"), off_mode=scores.get("off_mode"))


# ----- the cases ----------------------------------------------------------------------------------
def our_cases(dist, make_sde, N: int, ald_steps_each: int, shape, dtype, device, budgets):
    """Our samplers at the SDE's N (the reference setting) and at the matched NFE budgets."""
    def pc(sde, predictor, corrector, budget=None):
        def run(score_fn, seed):
            r = samplers.pc_sample(score_fn, sde, shape, predictor=predictor, corrector=corrector,
                                   eps=SAMPLE_EPS, dtype=dtype, device=device,
                                   generator=generator(seed, device))
            return r.x, r.nfe
        return Case("ours", f"pc {predictor}+{corrector}", f"N={sde.N}", sde.N, run,
                    dist.score_fn(sde), unit_gaussian_score(sde), budget)

    def ode(sde, method, num_steps=None, budget=None):
        def run(score_fn, seed):
            r = ode_sample(score_fn, sde, shape, method=method, num_steps=num_steps,
                           eps=SAMPLE_EPS, denoise=True, dtype=dtype, device=device,
                           generator=generator(seed, device))
            return r.x, r.nfe
        steps_label = "rtol=atol=1e-5" if num_steps is None else f"{num_steps} steps"
        return Case("ours", f"ode {method}", steps_label, num_steps, run, dist.score_fn(sde),
                    unit_gaussian_score(sde), budget)

    def fast(sde, name, num_steps, budget, **kwargs):
        """samplers/fast.py: ddim_sample (if kwargs has eta) or dpm_solver_sample, always with
        the final Tweedie denoising step at eps (+ 1 NFE)."""
        def run(score_fn, seed):
            fn = ddim_sample if "eta" in kwargs else dpm_solver_sample
            r = fn(score_fn, sde, shape, num_steps=num_steps, eps=SAMPLE_EPS, denoise=True,
                   dtype=dtype, device=device, generator=generator(seed, device), **kwargs)
            return r.x, r.nfe
        return Case("ours", name, f"{num_steps} steps", num_steps, run, dist.score_fn(sde),
                    unit_gaussian_score(sde), budget)

    sde = make_sde(N)
    discrete = sde.has_discrete_chain                      # VP and VE have a discrete chain
    cases = [pc(sde, "reverse_diffusion", "langevin"), pc(sde, "euler_maruyama", "none")]
    if discrete:
        cases.append(pc(sde, "ancestral_sampling", "langevin"))
    if sde.keeps_data_scale:                               # NCSN (VE): 10 levels, n steps each
        levels = sde_lib.VESDE(sigma_min=sde.sigma_min, sigma_max=sde.sigma_max, N=10)

        def ald(score_fn, seed):
            r = samplers.ald_sample(score_fn, levels, shape, n_steps_each=ald_steps_each,
                                    step_lr=2e-5, dtype=dtype, device=device,
                                    generator=generator(seed, device))
            return r.x, r.nfe
        cases.append(Case("ours", "ald", f"10 levels x {ald_steps_each}", 10 * ald_steps_each + 1,
                          ald, dist.score_fn(levels), unit_gaussian_score(levels)))
    cases.append(ode(sde, "dopri5"))
    matched = []
    for budget in budgets:
        small = make_sde(budget)
        matched += [pc(small, "euler_maruyama", "none", budget),
                    pc(small, "reverse_diffusion", "none", budget)]
        if discrete:
            matched.append(pc(small, "ancestral_sampling", "none", budget))
        matched.append(pc(make_sde(budget // 2), "reverse_diffusion", "langevin", budget))
        # + 1 NFE for the final Tweedie denoising step
        matched += [ode(sde, "euler", budget - 1, budget),
                    ode(sde, "heun2", (budget - 1) // 2, budget)]
        n = budget - 1          # NFE = steps (x 3 for 3S) + 1 (final Tweedie step)
        matched += [
            fast(sde, "ddim eta=0 logsnr", n, budget, eta=0.0, spacing="logsnr"),
            fast(sde, "dpm++ 2M logsnr", n, budget, order=2, multistep=True),
            fast(sde, "dpm++ 3M logsnr", n, budget, order=3, multistep=True),
            # the default lowers the last multistep orders below 15 steps (official code)
            fast(sde, "dpm++ 2M logsnr, lower_order_final off", n, budget, order=2,
                 multistep=True, lower_order_final=False),
            fast(sde, "dpm++ 3M logsnr, lower_order_final off", n, budget, order=3,
                 multistep=True, lower_order_final=False),
            fast(sde, "dpm++ 3S logsnr", (budget - 1) // 3, budget, order=3,
                 multistep=False),
            fast(sde, "dpm 2M logsnr (noise pred.)", n, budget, order=2, multistep=True,
                 algorithm="dpmsolver"),
            # lower_order_final off: then it is k-diffusion's sample_dpmpp_2m exactly
            # (same grid, update and final step), a check of the adapter
            fast(sde, "dpm++ 2M karras, lower_order_final off", n, budget, order=2,
                 multistep=True, spacing="karras", lower_order_final=False)]
    return cases, matched


#: k-diffusion sampler -> score evaluations per step (the last step to sigma = 0 takes one).
K_SAMPLERS = {"sample_euler": 1, "sample_euler_ancestral": 1, "sample_lms": 1,
              "sample_dpmpp_2m": 1, "sample_heun": 2, "sample_dpm_2": 2}


def k_cases(ks, dist, sde, shape, dtype, device, budgets):
    """k-diffusion's samplers on Karras sigmas (rho = 7) from sigma(eps) to sigma(T), + 0;
    x_T ~ N(0, sigma(T)^2 I) from the same seed as our prior draw."""
    sigma_min, sigma_max = sigma_of_t(sde, SAMPLE_EPS), sigma_of_t(sde, sde.T)
    cases = []
    for budget in budgets:
        for name, per_step in K_SAMPLERS.items():
            steps = budget if per_step == 1 else (budget + 1) // 2      # NFE = 2 steps - 1
            sigmas = ks.get_sigmas_karras(steps, sigma_min, sigma_max, rho=7.0,
                                          device=device).to(dtype)

            def run(model, seed, fn=getattr(ks, name), sigmas=sigmas):
                model = CountingScore(model)
                x = torch.randn(shape, generator=generator(seed, device), device=device,
                                dtype=dtype) * sigmas[0]
                torch.manual_seed(seed)          # k-diffusion's ancestral noise: global RNG
                return fn(model, x, sigmas, disable=True), model.nfe
            cases.append(Case("k-diffusion", name.removeprefix("sample_"), f"{steps} steps",
                              steps, run, KDiffusionDenoiser(dist.score_fn(sde), sde),
                              unit_gaussian_denoiser, budget))
    return cases


# ----- likelihoods ----------------------------------------------------------------------------
def likelihood_rows(ks, dist, sde_name, sde, n_points, tol, device):
    """Ours (exact trace, Hutchinson) and k-diffusion's log_likelihood vs log p_eps(x)."""
    eps = LIKELIHOOD_EPS
    x = dist.sample_marginal(sde, eps, n_points, generator=torch.Generator().manual_seed(7),
                             dtype=F64, device=device)
    truth = dist.marginal_log_prob(sde, x, eps)
    score_fn = dist.score_fn(sde)
    runs = {}
    for trace in ("exact", "hutchinson"):
        runs[f"ours {trace}"] = lambda trace=trace: (lambda r: (r.logp, r.nfe))(log_likelihood(
            score_fn, sde, x, trace=trace, rtol=tol, atol=tol, eps=eps,
            generator=generator(8, device)))
    if ks is not None:
        # k-diffusion returns log p of x_ve = x / alpha(eps) in VE space at sigma(eps), with the
        # prior N(0, sigma(T)^2 I). Change of variables x = alpha x_ve (a D-dim scaling):
        #     log p_x(x) = log p_ve(x / alpha) + log |det d x_ve / d x|
        #                = log p_ve(x / alpha) - D log alpha(eps).
        alpha = sde.marginal_coeffs(torch.tensor(eps, dtype=F64))[0].item()

        def k_run():
            torch.manual_seed(8)                 # its Rademacher probe: global RNG
            logp, info = ks.log_likelihood(KDiffusionDenoiser(score_fn, sde), x / alpha,
                                           sigma_of_t(sde, eps), sigma_of_t(sde, sde.T),
                                           atol=tol, rtol=tol)
            return logp - DIM * math.log(alpha), info["fevals"]
        runs["k-diffusion hutchinson"] = k_run
    rows, hutchinson = [], None
    for name, run in runs.items():
        (logp, nfe), wall = timed(run, device)
        logp = logp.to(F64)
        error = logp - truth
        # On the CPU both Hutchinson estimators draw the same Rademacher probes (torch.randint
        # from a generator seeded 8), so their difference is the ODE solve's alone.
        same_probes = None if hutchinson is None else (logp - hutchinson).abs().mean().item()
        if name == "ours hutchinson":
            hutchinson = logp
        rows.append(dict(method=name, sde=sde_name, points=n_points, tol=tol, nfe=nfe,
                         wall_s=wall, mean_abs_error=error.abs().mean().item(),
                         mean_error=error.mean().item(), true_mean_logp=truth.mean().item(),
                         mean_abs_diff_to_ours_hutchinson=same_probes))
    return rows


# ----- the per-NFE overhead, side by side -----------------------------------------------------
class TimedModel:
    """Wraps the trivial model (score or denoiser), counting its calls and the seconds spent
    inside them (CPU: the calls are synchronous), so that the sampler's own overhead is the
    wall time minus the model's: the two sides' trivial models differ (ours computes
    alpha(t), std(t) from t, k-diffusion's takes sigma), and that is not the sampler's cost."""

    def __init__(self, model: Callable):
        self.model, self.nfe, self.seconds = model, 0, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.model(*args)
        self.seconds += time.perf_counter() - start
        self.nfe += 1
        return out


def overhead_cases(ks, sde, shape, dtype, device, budget: int) -> dict:
    """name -> run(seed) -> TimedModel of one sampler with the trivial model at ``budget``
    NFE: our fast samplers and PC / ODE loops, and k-diffusion's samplers on the same batch."""
    n = budget - 1                                   # + 1 NFE: our final Tweedie step

    def ours(fn, sde=sde, **kw):
        def run(seed):
            model = TimedModel(unit_gaussian_score(sde))
            fn(model, sde, shape, dtype=dtype, device=device, generator=generator(seed, device),
               **kw)
            return model
        return run
    cases = {
        "ddim (ours)": ours(ddim_sample, num_steps=n),
        "dpm++ 2M (ours)": ours(dpm_solver_sample, num_steps=n, order=2),
        "dpm++ 3M (ours)": ours(dpm_solver_sample, num_steps=n, order=3),
        "edm heun (ours)": ours(samplers.edm_sample, num_steps=(budget + 1) // 2),
        "ode euler (ours)": ours(ode_sample, method="euler", num_steps=n, denoise=True),
        # PC takes one step per level: an SDE with N = budget
        "pc euler_maruyama (ours)": ours(samplers.pc_sample, sde=type(sde)(N=budget),
                                         predictor="euler_maruyama", corrector="none"),
    }
    if ks is not None:
        sigma_min, sigma_max = sigma_of_t(sde, SAMPLE_EPS), sigma_of_t(sde, sde.T)
        for name, per_step in K_SAMPLERS.items():
            steps = budget if per_step == 1 else (budget + 1) // 2
            sigmas = ks.get_sigmas_karras(steps, sigma_min, sigma_max, rho=7.0,
                                          device=device).to(dtype)

            def run(seed, fn=getattr(ks, name), sigmas=sigmas):
                model = TimedModel(unit_gaussian_denoiser)
                x = torch.randn(shape, generator=generator(seed, device), device=device,
                                dtype=dtype) * sigmas[0]
                torch.manual_seed(seed)
                fn(model, x, sigmas, disable=True)
                return model
            cases[f"{name.removeprefix('sample_')} (k-diffusion)"] = run
    return cases


def overhead_comparison(ks, shape, dtype, device, budgets, rounds: int) -> list[dict]:
    """ms per NFE of every overhead case, in all and without the model's own time,
    interleaved: each round runs every case once, in turn, so machine load hits all alike;
    the medians over rounds are reported."""
    rows = []
    for sde_name, make_sde in SDES.items():
        for budget in budgets:
            cases = overhead_cases(ks, make_sde(1000), shape, dtype, device, budget)
            totals = {name: [] for name in cases}
            loops = {name: [] for name in cases}
            nfes = {}
            for round_ in range(rounds + 1):             # round 0 warms up
                for name, run in cases.items():
                    model, wall = timed(lambda: run(round_), device)
                    nfes[name] = model.nfe
                    if round_:
                        totals[name].append(1e3 * wall / model.nfe)
                        loops[name].append(1e3 * (wall - model.seconds) / model.nfe)
            rows += [dict(sde=sde_name, budget=budget, sampler=name, nfe=nfes[name],
                          ms_per_nfe=statistics.median(totals[name]),
                          loop_ms_per_nfe=statistics.median(loops[name])) for name in cases]
    return rows


def overhead_comparison_table(rows) -> str:
    """Median ms/NFE per sampler over SDEs and budgets, in all and without the model, with
    the ratios of the latter to k-diffusion's dpmpp_2m in the same runs."""
    by_sampler = {}
    for r in rows:
        by_sampler.setdefault(r["sampler"], []).append(r)
    reference = {(r["sde"], r["budget"]): r for r in rows
                 if r["sampler"] == "dpmpp_2m (k-diffusion)"}
    lines = []
    for name, group in by_sampler.items():
        ratios = [r["loop_ms_per_nfe"] / reference[(r["sde"], r["budget"])]["loop_ms_per_nfe"]
                  for r in group if (r["sde"], r["budget"]) in reference]
        lines.append([name, len(group),
                      fmt(statistics.median(r["ms_per_nfe"] for r in group), ".3f"),
                      fmt(statistics.median(r["loop_ms_per_nfe"] for r in group), ".3f"),
                      fmt(statistics.median(ratios), ".2f") if ratios else "-"])
    return markdown(["sampler", "runs", "ms/NFE in all", "ms/NFE without the model",
                     "ratio of the latter to k-diffusion dpmpp_2m"], lines)


# ----- few-step race, round two (issue 14 item 3): held-out distributions ---------------------
def _rotation(dim: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def correlated_gaussian16(seed: int = 31) -> sde_lib.GaussianMixture:
    """16-D Gaussian with AR(1) correlations 0.9^|i-j| between coordinates whose stds are
    log-spaced 0.05..1.2 in a seeded order, mean N(0, 0.5^2) (seeded)."""
    g = torch.Generator().manual_seed(seed)
    dim = 16
    stds = torch.logspace(math.log10(0.05), math.log10(1.2), dim, dtype=F64)
    stds = stds[torch.randperm(dim, generator=g)]
    idx = torch.arange(dim, dtype=F64)
    corr = 0.9 ** (idx[:, None] - idx[None, :]).abs()
    cov = stds[:, None] * corr * stds[None, :]
    mean = 0.5 * torch.randn(dim, generator=g, dtype=F64)
    return sde_lib.GaussianMixture(torch.ones(1, dtype=F64), mean[None], cov[None])


def unequal_mixture32(seed: int = 47) -> sde_lib.GaussianMixture:
    """32-D, 10 components: means N(0, 2^2 I), covariances Q diag(s^2) Q^T with s log-uniform
    in [0.05, 0.5] and Q a random rotation, weights 0.7^k (k = 0..9: 1 to 0.04)."""
    g = torch.Generator().manual_seed(seed)
    dim, k = 32, 10
    means = 2.0 * torch.randn(k, dim, generator=g, dtype=F64)
    covs = []
    for _ in range(k):
        q = _rotation(dim, g)
        u = torch.rand(dim, generator=g, dtype=F64)
        s = torch.exp(math.log(0.05) + u * (math.log(0.5) - math.log(0.05)))
        covs.append(q @ torch.diag(s ** 2) @ q.T)
    weights = 0.7 ** torch.arange(k, dtype=F64)
    return sde_lib.GaussianMixture(weights, means, torch.stack(covs))


def spiral_mixture20() -> sde_lib.GaussianMixture:
    """2-D: 20 small Gaussians along an Archimedean spiral, angle 0.5 + 0.55 k, radius
    0.2 + 0.11 k (k = 0..19), std 0.03 + 0.002 k, weights 1 + (k mod 4)."""
    k = torch.arange(20, dtype=F64)
    theta, radius = 0.5 + 0.55 * k, 0.2 + 0.11 * k
    means = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=1)
    stds = 0.03 + 0.002 * k
    covs = stds[:, None, None] ** 2 * torch.eye(2, dtype=F64)
    return sde_lib.GaussianMixture(1.0 + k % 4, means, covs)


#: Held-out distributions of the race (none was used to choose a default): name -> factory.
RACE_DISTRIBUTIONS = {"corr16": correlated_gaussian16, "mix32": unequal_mixture32,
                      "spiral20": spiral_mixture20}
RACE_SDES = {"VP": lambda: sde_lib.VPSDE(), "subVP": lambda: sde_lib.subVPSDE(),
             "VE": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0)}
#: The end point given to k-diffusion besides sigma(eps): our default sigma_min.
RACE_K_SIGMA_MIN = 0.02


def race_our_cases(budget: int, fitted=None, jump=None):
    """(label, sampler name, options): ours at ``budget`` NFE, the final Tweedie step counted
    (num_steps = budget - 1; EDM: (budget + 1) // 2 levels). The rows labelled "(default)"
    (RACE_DEFAULTS) are what a user gets from ``--sampler dpm_solver`` / ``unipc`` / ``ipndm``
    with the registry defaults; the others name every option they change, and those not
    marked lof=off lower the final orders by the official rule (``lower_order_final=True``:
    below 15 steps at any count; the default since round two starts at 5 steps)."""
    n = budget - 1
    out = [("dpm_solver (default)", "dpm_solver", dict(num_steps=n)),
           ("unipc (default)", "unipc", dict(num_steps=n)),
           ("ddim", "ddim", dict(num_steps=n)),
           ("ipndm (default)", "ipndm", dict(num_steps=n)),
           ("ipndm order 4 logsnr", "ipndm", dict(num_steps=n, order=4, spacing="logsnr")),
           ("edm", "edm", dict(num_steps=(budget + 1) // 2)),
           ("dpm_solver 2M lof=off", "dpm_solver", dict(num_steps=n, lower_order_final=False)),
           ("dpm_solver 3M", "dpm_solver", dict(num_steps=n, order=3, lower_order_final=True)),
           ("dpm_solver 3M lof=off", "dpm_solver", dict(num_steps=n, order=3,
                                                         lower_order_final=False)),
           ("dpm_solver 2M karras", "dpm_solver", dict(num_steps=n, spacing="karras",
                                                         lower_order_final=True)),
           ("dpm_solver 2M sigma_min=eps", "dpm_solver", dict(num_steps=n, sigma_min=None,
                                                                lower_order_final=True)),
           ("unipc order 3", "unipc", dict(num_steps=n, order=3, lower_order_final=True)),
           ("unipc order 3 lof=off", "unipc", dict(num_steps=n, order=3,
                                                   lower_order_final=False)),
           ("unipc bh1", "unipc", dict(num_steps=n, variant="bh1", lower_order_final=True)),
           ("unipc bh1 order 3", "unipc", dict(num_steps=n, variant="bh1", order=3,
                                               lower_order_final=True)),
           ("unipc lof=off", "unipc", dict(num_steps=n, lower_order_final=False)),
           ("unipc sigma_min=eps", "unipc", dict(num_steps=n, sigma_min=None,
                                                 lower_order_final=True)),
           ("ipndm order 3 logsnr", "ipndm", dict(num_steps=n, order=3, spacing="logsnr")),
           ("ipndm order 2 logsnr", "ipndm", dict(num_steps=n, order=2, spacing="logsnr")),
           ("ipndm order 3 karras", "ipndm", dict(num_steps=n, order=3, spacing="karras")),
           ("unipc lof=off karras", "unipc", dict(num_steps=n, lower_order_final=False,
                                                  spacing="karras")),
           ("dpm_solver 2M lof=off karras", "dpm_solver", dict(num_steps=n, spacing="karras",
                                                               lower_order_final=False))]
    if fitted is not None:      # schedules fitted on the data's mean and covariance
        for solver in ("ipndm", "dpm_solver"):
            out.append((f"{solver} fitted on the moments", solver,
                        dict(num_steps=n, schedule=fitted(solver, n))))
    if jump is not None:        # one step from sigma(T) to 5, then log-SNR
        for solver in ("dpm_solver", "unipc"):
            out.append((f"{solver} jump to 5", solver, dict(num_steps=n, schedule=jump(n))))
    return out


def race_jump_schedules(sde_name: str, sde, folder: Path, sigma_jump: float = 5.0):
    """jump(num_steps) -> the path of ``race_jump_schedule`` for ``sde`` (written once)."""
    def jump(num_steps: int) -> str:
        key = ("jump", sde_name, sigma_jump, num_steps)
        if key not in RACE_FITTED:
            path = folder / f"{'_'.join(map(str, key))}.json"
            RACE_FITTED[key] = race_jump_schedule(sde, num_steps, sigma_jump, path)
        return RACE_FITTED[key]
    return jump


def race_jump_schedule(sde, num_steps: int, sigma_jump: float, path: Path) -> str:
    """A schedule file whose first step goes from sigma(T) straight to ``sigma_jump`` (when
    below sigma(T)), then log-uniform in sigma to SIGMA_MIN: for data-prediction solvers the
    first step is exact while the data prediction stays at the data mean."""
    from samplers.harness import Schedule
    from samplers.schedules_opt import save_schedule
    top = float(Schedule(sde).at(torch.tensor(float(sde.T), dtype=F64)).sigma)
    hi, lo = min(sigma_jump, top / 2), samplers.fast.SIGMA_MIN
    levels = ([top] + [math.exp(math.log(hi) + k / (num_steps - 1) * math.log(lo / hi))
                       for k in range(num_steps)] if num_steps > 1 else [top, lo])
    save_schedule(path, solver="any", solver_options={}, sde=repr(sde), proxy={},
                  method={"jump_to": hi}, entries={num_steps: {"sigmas": levels,
                                                               "nfe": num_steps + 1}})
    return str(path)


#: Schedules of the race, shared by its seeds: (dist, SDE, solver, steps) or ("jump", SDE,
#: sigma, steps) -> path.
RACE_FITTED: dict = {}


def race_moment_schedules(dist_name: str, dist, sde_name: str, sde, folder: Path):
    """fitted(solver, num_steps) -> the path of a step schedule for the registry default of
    ``solver`` fitted (samplers.schedules_opt.fit_schedule, sigma_min = 0.02) on a Gaussian
    with ``dist``'s mean and covariance: the proxy a user can compute from training data. On
    a Gaussian data set the proxy is the data itself (not held out)."""
    from samplers.schedules_opt import fit_schedule, proxy_description, save_schedule
    proxy = sde_lib.GaussianMixture(torch.ones(1, dtype=F64), dist.mean()[None],
                                    dist.covariance()[None])

    def fitted(solver: str, num_steps: int) -> str:
        key = (dist_name, sde_name, solver, num_steps)
        if key not in RACE_FITTED:
            fit = fit_schedule(proxy, sde, solver, num_steps, sigma_min=samplers.fast.SIGMA_MIN)
            path = folder / f"{'_'.join(map(str, key))}.json"
            save_schedule(path, solver=solver, solver_options={}, sde=repr(sde),
                          proxy=proxy_description(proxy), method={"fit": "race"},
                          entries={num_steps: {"sigmas": fit["sigmas"], "nfe": num_steps + 1}})
            RACE_FITTED[key] = str(path)
        return RACE_FITTED[key]
    return fitted


#: k-diffusion's deterministic (and two ancestral) fixed-step samplers: name -> (NFE per step
#: but the last, extra keyword arguments). Its last step (to sigma = 0) takes one evaluation.
RACE_K_SAMPLERS = {"euler": (1, {}), "heun": (2, {}), "dpm_2": (2, {}), "lms": (1, {}),
                   "dpmpp_2m": (1, {}), "dpmpp_2m_sde": (1, dict(eta=0.0)),
                   "dpmpp_3m_sde": (1, dict(eta=0.0)), "dpmpp_2s_ancestral": (2, dict(eta=0.0)),
                   "euler_ancestral": (1, {})}


def race_k_runs(ks, sde, budget: int):
    """(label, run(model, x_T_noise, seed) -> x) for k-diffusion at ``budget`` NFE: every
    sampler of RACE_K_SAMPLERS on Karras sigmas (rho 7), and the 1-NFE-per-step ones also on
    get_sigmas_exponential (uniform in log sigma), each from sigma(T) down to sigma(eps) and
    to RACE_K_SIGMA_MIN, + 0."""
    sigma_max = sigma_of_t(sde, sde.T)
    ends = {"sigma(eps)": sigma_of_t(sde, SAMPLE_EPS), "0.02": RACE_K_SIGMA_MIN}
    out = []
    for end, sigma_min in ends.items():
        for name, (per_step, kw) in RACE_K_SAMPLERS.items():
            steps = budget if per_step == 1 else (budget + 1) // 2
            grids = {"karras": ks.get_sigmas_karras(steps, sigma_min, sigma_max, rho=7.0)}
            if per_step == 1 and not name.endswith("ancestral"):
                grids["exp"] = ks.get_sigmas_exponential(steps, sigma_min, sigma_max)
            for grid, sigmas in grids.items():
                out.append((f"{name} {grid} end={end}", getattr(ks, f"sample_{name}"),
                            sigmas.to(F64), kw))
    return out


def race_two(args, ks) -> int:
    """Ours vs k-diffusion, best per (distribution, SDE, NFE) cell by FD / floor averaged over
    the sampler seeds of --race-seeds (or the runs merged by --race-merge)."""
    if args.race_merge:
        runs = [json.loads(Path(f).read_text()) for f in args.race_merge]
        rows = [r for run in runs for r in run["rows"]]
        settings = [run["settings"] for run in runs]
    else:
        torch.set_num_threads(args.threads)
        seeds = [int(s) for s in str(args.race_seeds).split(",") if s]
        rows, settings = [], []
        for seed in seeds:
            seed_rows, seed_settings = race_one_seed(args, ks, seed)
            rows += seed_rows
            settings.append(seed_settings)
    cells = race_cells(rows)
    print("\n" + race_table(cells), flush=True)
    print("\n" + race_summary(cells), flush=True)
    print("\n" + race_every_row(rows), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(settings=settings, rows=rows, cells=cells),
                                             indent=None, separators=(",", ":")))
        print(f"\n# wrote {args.out}")
    if args.race_summary_out:
        Path(args.race_summary_out).write_text(json.dumps(
            dict(settings=settings, cells=cells, every_row=race_every_row(rows).splitlines()),
            indent=1) + "\n")
        print(f"# wrote {args.race_summary_out}")
    return 0


def race_one_seed(args, ks, seed: int):
    """(rows, settings) of one sampler seed: every (distribution, SDE, budget) cell, ours,
    the converged ODE and k-diffusion; the reference and floor sets use 100 seed + 1, + 2."""
    budgets = tuple(int(b) for b in (args.budgets or "5,10,20").split(",") if b)
    dist_names = [d for d in (args.race_distributions or ",".join(RACE_DISTRIBUTIONS)).split(",")]
    sde_names = [s for s in args.sdes.split(",") if s]
    start = time.time()
    settings = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                    machine=machine_description(), torch=torch.__version__, dtype="float64",
                    threads=torch.get_num_threads(), budgets=list(budgets),
                    samples=args.samples, samples_dim_ge_32=args.samples // 2,
                    sampler_seed=seed, reference_seed=100 * seed + 1,
                    floor_seed=100 * seed + 2,
                    sample_eps=SAMPLE_EPS, k_sigma_min=RACE_K_SIGMA_MIN,
                    sdes={s: repr(RACE_SDES[s]()) for s in sde_names},
                    k_diffusion=getattr(ks, "__file__", None))
    print("# settings: " + json.dumps(settings), flush=True)
    rows, only = [], args.race_only
    folder = args.race_schedules or tempfile.mkdtemp(prefix="race_schedules_")
    Path(folder).mkdir(parents=True, exist_ok=True)
    for dist_name in dist_names:
        if dist_name in RACE_DISTRIBUTIONS:
            dist = RACE_DISTRIBUTIONS[dist_name]()
        else:       # the distributions the defaults were chosen on (needs pytest: testbed)
            from endpoints import DISTRIBUTIONS
            dist = DISTRIBUTIONS[dist_name][0]()
        n = args.samples if dist.dim < 32 else args.samples // 2
        shape = (n, dist.dim)
        ref = dist.sample(n, generator=torch.Generator().manual_seed(100 * seed + 1), dtype=F64)
        second = dist.sample(n, generator=torch.Generator().manual_seed(100 * seed + 2),
                             dtype=F64)
        floor = frechet_distance(second, ref)
        print(f"# seed {seed} {dist_name}: D={dist.dim}, {n} samples, floor FD {floor:.5f}",
              flush=True)
        for sde_name in sde_names:
            sde = RACE_SDES[sde_name]()
            score_fn = dist.score_fn(sde)
            fitted = race_moment_schedules(dist_name, dist, sde_name, sde, Path(folder))
            jump = race_jump_schedules(sde_name, sde, Path(folder))
            for budget in budgets:
                def add(family, label, x, nfe, error=None):
                    fd = None if x is None else frechet_distance(x, ref)
                    rows.append(dict(dist=dist_name, sde=sde_name, budget=budget, seed=seed,
                                     floor=floor, family=family, sampler=label, nfe=nfe, fd=fd,
                                     ratio=None if fd is None else fd / floor, error=error))
                    if nfe is not None and nfe > budget and family != "converged ODE":
                        print(f"# WARNING: {label} made {nfe} NFE > {budget}", flush=True)
                for label, name, kw in race_our_cases(budget, fitted, jump):
                    if only and not re.search(only, label):
                        continue
                    counting = CountingScore(score_fn)
                    try:
                        x = samplers.SAMPLERS[name].fn(
                            counting, sde, shape, dtype=F64,
                            generator=torch.Generator().manual_seed(seed), **kw).x
                        if not torch.isfinite(x).all():
                            raise FloatingPointError("non-finite samples")
                        add("ours", label, x, counting.nfe)
                    except (ValueError, FloatingPointError) as error:
                        add("ours", label, None, None, str(error).split(";")[0])
                if only:
                    continue
                # The converged probability-flow ODE from the same x_T (3M, 200 steps, to eps):
                # the FD a deterministic sampler tends to with this seed (its own noise).
                x = samplers.SAMPLERS["dpm_solver"].fn(
                    score_fn, sde, shape, num_steps=200, order=3, sigma_min=None, dtype=F64,
                    generator=torch.Generator().manual_seed(seed)).x
                add("converged ODE", RACE_CONVERGED, x, 201)
                if ks is not None:
                    model = KDiffusionDenoiser(score_fn, sde)
                    for label, fn, sigmas, kw in race_k_runs(ks, sde, budget):
                        counting = CountingScore(model)
                        x = torch.randn(shape, generator=generator(seed, torch.device("cpu")),
                                        dtype=F64) * sigmas[0]
                        torch.manual_seed(seed)       # ancestral noise: the global RNG
                        try:
                            x = fn(counting, x, sigmas, disable=True, **kw)
                            if not torch.isfinite(x).all():
                                raise FloatingPointError("non-finite samples")
                            add("k-diffusion", label, x, counting.nfe)
                        except (ValueError, FloatingPointError) as error:
                            add("k-diffusion", label, None, None, str(error))
            print(f"# seed {seed} {dist_name} {sde_name} done ({time.time() - start:.0f} s)",
                  flush=True)
    return rows, settings


RACE_CONVERGED = "dpm_solver 3M 200 steps, eps"
#: What a user gets from ``--sampler <name>`` with the registry defaults: the race's rows.
RACE_DEFAULTS = ("ipndm (default)", "dpm_solver (default)", "unipc (default)")
#: A difference of means below this fraction of k-diffusion's counts as a tie, whatever the
#: seeds' spread (FD / floor near 1 is the finite-sample FD's own noise).
RACE_TIE = 0.05
#: ... and so does one below this many standard errors of the paired per-seed differences.
RACE_TIE_SE = 2.0


def race_stats(rows) -> tuple[dict, dict]:
    """({(cell, family, sampler): {seed: FD}} over the rows with a result,
    {cell: {seed: floor FD}})."""
    out, floors = {}, {}
    for r in rows:
        cell, seed = (r["dist"], r["sde"], r["budget"]), r.get("seed", 0)
        floors.setdefault(cell, {})[seed] = r["floor"]
        if r["fd"] is not None:
            out.setdefault((cell, r["family"], r["sampler"]), {})[seed] = r["fd"]
    return out, floors


def race_verdict(ours: dict, theirs: dict, floor: float) -> str:
    """Over the common seeds, with d_s = FD_ours - FD_theirs: 'tie' when |mean d| is within
    RACE_TIE of their mean FD or RACE_TIE_SE standard errors of the d_s, else 'win' (ours
    lower) or 'loss'. ``floor`` (the mean floor FD) only guards the scale of 0-FD cells."""
    seeds = sorted(set(ours) & set(theirs))
    diffs = [ours[s] - theirs[s] for s in seeds]
    mean = sum(diffs) / len(diffs)
    se = (math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
          if len(diffs) > 1 else 0.0)
    scale = max(sum(theirs[s] for s in seeds) / len(seeds), 1e-3 * floor)
    if abs(mean) <= max(RACE_TIE * scale, RACE_TIE_SE * se):
        return "tie"
    return "win" if mean < 0 else "loss"


def race_cells(rows) -> list[dict]:
    """Per cell: the best of ours and of k-diffusion by mean FD over the seeds (samplers that
    ran on every seed), each registry default and the converged ODE, as mean FD / mean floor
    (a mean of per-seed ratios would be inflated by the small floors of low-dimensional
    cells), and the paired verdicts against k-diffusion's best."""
    stats, floors = race_stats(rows)
    cells = []
    for cell, floor_by_seed in floors.items():
        seeds = set(floor_by_seed)
        floor = sum(floor_by_seed.values()) / len(seeds)

        def ratio(per_seed):
            return sum(per_seed.values()) / len(per_seed) / floor
        fam = {f: {lab: v for (c, ff, lab), v in stats.items() if c == cell and ff == f
                   and set(v) == seeds} for f in ("ours", "k-diffusion", "converged ODE")}
        best = {f: min(fam[f].items(), key=lambda kv: ratio(kv[1])) if fam[f] else None
                for f in ("ours", "k-diffusion")}
        kbest = best["k-diffusion"]
        conv = fam["converged ODE"].get(RACE_CONVERGED)
        entry = dict(dist=cell[0], sde=cell[1], budget=cell[2], seeds=len(seeds), floor=floor,
                     ours=best["ours"][0], ours_ratio=ratio(best["ours"][1]),
                     k=kbest and kbest[0], k_ratio=kbest and ratio(kbest[1]),
                     converged_ratio=conv and ratio(conv))
        entry["verdict"] = race_verdict(best["ours"][1], kbest[1], floor) if kbest else "-"
        entry["defaults"] = {
            label: dict(ratio=ratio(fam["ours"][label]),
                        verdict=race_verdict(fam["ours"][label], kbest[1], floor)
                        if kbest else "-")
            for label in RACE_DEFAULTS if label in fam["ours"]}
        cells.append(entry)
    return cells


def race_every_row(rows) -> str:
    """One line per row of ours: its W/T/L against k-diffusion's best of each cell and its
    worst mean FD / floor, per budget (how each candidate default would have done)."""
    stats, floors = race_stats(rows)
    budgets = sorted({cell[2] for cell in floors})
    labels = list(dict.fromkeys(lab for (_, fam, lab) in stats if fam == "ours"))
    lines = ["# every row of ours vs k-diffusion's best per cell: W/T/L (failed), worst "
             "FD/floor, per NFE"]
    for label in labels:
        parts = []
        for budget in budgets:
            verdicts, worst = [], 0.0
            for cell, floor_by_seed in floors.items():
                if cell[2] != budget:
                    continue
                floor = sum(floor_by_seed.values()) / len(floor_by_seed)
                k = [v for (c, f, _), v in stats.items() if c == cell and f == "k-diffusion"
                     and set(v) == set(floor_by_seed)]
                ours = stats.get((cell, "ours", label))
                if not k or ours is None or set(ours) != set(floor_by_seed):
                    verdicts.append("failed")
                    continue
                kbest = min(k, key=lambda v: sum(v.values()))
                verdicts.append(race_verdict(ours, kbest, floor))
                worst = max(worst, sum(ours.values()) / len(ours) / floor)
            parts.append(f"{budget}: {verdicts.count('win')}/{verdicts.count('tie')}/"
                         f"{verdicts.count('loss')}"
                         + (f" ({verdicts.count('failed')})" if "failed" in verdicts else "")
                         + f" {worst:.2f}")
        lines.append(f"# {label:32s} " + " | ".join(parts))
    return "\n".join(lines)


def race_table(cells) -> str:
    labels = [lab for lab in RACE_DEFAULTS if any(lab in c["defaults"] for c in cells)]
    return markdown(
        ["dist", "SDE", "NFE", "ours best", "FD/floor", "k-diffusion best", "FD/floor",
         "verdict", *labels, "converged ODE"],
        [[c["dist"], c["sde"], c["budget"], c["ours"], f"{c['ours_ratio']:.2f}",
          "-" if c["k"] is None else c["k"], fmt(c["k_ratio"], ".2f"), c["verdict"],
          *[(f"{c['defaults'][lab]['ratio']:.2f} {c['defaults'][lab]['verdict']}"
             if lab in c["defaults"] else "-") for lab in labels],
          fmt(c.get("converged_ratio"), ".2f")]
         for c in cells])


def race_summary(cells) -> str:
    lines = [f"# seeds per cell: {sorted({c['seeds'] for c in cells})}; FD / floor is the mean "
             "over the seeds; verdicts on the paired per-seed differences"]
    for verdict in ("win", "tie", "loss"):
        lines.append(f"# ours best vs k-diffusion best, {verdict}: "
                     f"{sum(c['verdict'] == verdict for c in cells)} of {len(cells)}")
    for b in sorted({c["budget"] for c in cells}):
        sub = [c for c in cells if c["budget"] == b]
        worst = max(sub, key=lambda c: c["ours_ratio"])
        parts = [f"# NFE {b}: worst ours-best FD/floor {worst['ours_ratio']:.2f} "
                 f"({worst['dist']} {worst['sde']})"]
        for lab in RACE_DEFAULTS:
            values = [c["defaults"][lab] for c in sub if lab in c["defaults"]]
            if values:
                verdicts = [v["verdict"] for v in values]
                parts.append(f"{lab}: worst {max(v['ratio'] for v in values):.2f}, "
                             f"{verdicts.count('win')}/{verdicts.count('tie')}/"
                             f"{verdicts.count('loss')} W/T/L")
        lines.append("; ".join(parts))
    return "\n".join(lines)


# ----- output ---------------------------------------------------------------------------------
def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def quality_headers(problem: str) -> list[str]:
    return (["FD", "FD whitened"] if problem == "gauss64"
            else ["FD", "mode TV", "off-mode %"])


def quality_cells(r: Row) -> list[str]:
    """The quality columns of one row: FD and whitened FD (Gaussian) or FD, mode TV and the
    off-mode percentage (mixture)."""
    if r.error is not None:
        return [f"failed: {r.error}"] + ["-"] * (len(quality_headers(r.problem)) - 1)
    if r.problem == "gauss64":
        return [fmt(r.fd, ".4f"), fmt(r.fd_whitened, ".3f")]
    return [fmt(r.fd, ".4f"), fmt(r.mode_tv, ".3f"), fmt(100 * r.off_mode, ".2f")]


def sampling_table(rows) -> str:
    problem = rows[0].problem if rows else "gauss64"
    return markdown(
        ["sampler", "SDE", "steps", "NFE", "wall (s)", *quality_headers(problem),
         "overhead ms/step", "overhead ms/NFE"],
        [[f"{r.sampler} {r.steps_label}" + (" (k-diffusion)" if r.family != "ours" else ""), r.sde,
          fmt(r.steps, "d"), fmt(r.nfe, "d"), fmt(r.wall_s, ".2f"), *quality_cells(r),
          fmt(r.overhead_ms_per_step, ".3f"), fmt(r.overhead_ms_per_nfe, ".3f")] for r in rows])


def matched_cell(r: Row) -> str:
    """'FD / whitened FD (NFE)' (Gaussian) or 'FD / mode TV / off-mode % (NFE)' (mixture)."""
    if r.error is not None:
        return "failed"
    if r.problem == "gauss64":
        return f"{r.fd:.3f} / {r.fd_whitened:.2f} ({r.nfe})"
    return f"{r.fd:.4f} / {r.mode_tv:.3f} / {100 * r.off_mode:.2f} ({r.nfe})"


def matched_table(rows, budgets) -> str:
    """Quality by sampler (rows) and NFE budget (columns), one SDE and problem."""
    by_name = {}
    for r in rows:
        by_name.setdefault(f"{r.sampler} ({r.family})", {})[r.budget] = matched_cell(r)
    return markdown(["sampler", *[f"NFE <= {b}" for b in budgets]],
                    [[name, *[cells.get(b, "-") for b in budgets]]
                     for name, cells in by_name.items()])


#: Our rows left out of "ours best": the Karras-grid 2M row is k-diffusion's sample_dpmpp_2m
#: reimplemented (a check of the adapter), not a sampler of ours to compare with it.
NOT_OURS_BEST = ("dpm++ 2M karras",)


def best_table(rows, budgets, metrics) -> str:
    """Best of ours vs best of k-diffusion per SDE, budget and metric (lower is better):
    'value (sampler, NFE)'; the last column says, per metric, whether ours is lower ("yes"),
    equal ("tie") or higher ("no"). Rows named in NOT_OURS_BEST are left out of ours."""
    header = ["SDE", "NFE budget"]
    for m in metrics:
        header += [f"ours best {m}", f"k-diffusion best {m}"]
    header.append("beat best peer?")
    out = []
    for sde in dict.fromkeys(r.sde for r in rows):
        for b in budgets:
            line, wins = [sde, b], []
            for m in metrics:
                best = {}
                for fam in ("ours", "k-diffusion"):
                    cand = [r for r in rows if r.sde == sde and r.budget == b and r.family == fam
                            and r.error is None and getattr(r, m) is not None
                            and math.isfinite(getattr(r, m))
                            and not (fam == "ours" and r.sampler.startswith(NOT_OURS_BEST))]
                    best[fam] = min(cand, key=lambda r: getattr(r, m)) if cand else None
                for fam in ("ours", "k-diffusion"):
                    r = best[fam]
                    line.append("-" if r is None else f"{getattr(r, m):.4g} ({r.sampler}, {r.nfe})")
                if best["ours"] and best["k-diffusion"]:
                    a, b_ = getattr(best["ours"], m), getattr(best["k-diffusion"], m)
                    wins.append("yes" if a < b_ else "tie" if a == b_ else "no")
            line.append(" / ".join(wins) or "-")
            out.append(line)
    return markdown(header, out)


def overhead_table(rows) -> str:
    """Median overhead per step and per NFE of each sampler over all its runs (SDEs, budgets)."""
    groups = {}
    for r in rows:
        if r.overhead_ms_per_nfe is not None:
            groups.setdefault(f"{r.sampler} ({r.family})", []).append(r)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None
    return markdown(["sampler", "runs", "median overhead ms/step", "median overhead ms/NFE"],
                    [[name, len(g), fmt(median(r.overhead_ms_per_step for r in g), ".3f"),
                      fmt(median(r.overhead_ms_per_nfe for r in g), ".3f")]
                     for name, g in groups.items()])


def likelihood_table(rows) -> str:
    return markdown(["method", "SDE", "points", "NFE", "wall (s)", "mean abs error (nats)",
                     "mean error (nats)", "mean abs diff to ours hutchinson"],
                    [[r["method"], r["sde"], r["points"], r["nfe"], f"{r['wall_s']:.2f}",
                      f"{r['mean_abs_error']:.4f}", f"{r['mean_error']:+.4f}",
                      fmt(r["mean_abs_diff_to_ours_hutchinson"], ".4f")] for r in rows])


# ----- main -----------------------------------------------------------------------------------
def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="N=100 steps (not 1000), NFE budgets 5/10/20, 32 likelihood points")
    p.add_argument("--samples", type=int, default=2000,
                   help="samples per run on the 64-D Gaussian (default 2000)")
    p.add_argument("--mixture-samples", type=int, default=10000,
                   help="samples per run on the 2-D mixture (default 10000)")
    p.add_argument("--problems", default=",".join(PROBLEMS),
                   help="comma-separated subset of " + ",".join(PROBLEMS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="sampling state dtype (likelihoods always run in float64)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    p.add_argument("--sdes", default=",".join(SDES),
                   help="comma-separated subset of " + ",".join(SDES))
    p.add_argument("--no-likelihood", action="store_true", help="skip the likelihood comparison")
    p.add_argument("--no-standard", action="store_true",
                   help="skip the standard-setting section (N-step PC, ALD, dopri5)")
    p.add_argument("--budgets", help="comma-separated NFE budgets (default 5,10,20,50,100; "
                   "--quick: 5,10,20)")
    p.add_argument("--out", help="write all rows and settings to this JSON file")
    p.add_argument("--summarize", metavar="RESULTS_JSON",
                   help="only print the <= 20 NFE summaries of an earlier --out file, and exit")
    p.add_argument("--overhead", action="store_true",
                   help="only time the per-NFE overhead (trivial model) of our samplers and "
                   "k-diffusion's, interleaved, and exit")
    p.add_argument("--rounds", type=int, default=7, help="--overhead: timed rounds per case")
    p.add_argument("--race2", action="store_true",
                   help="only the few-step race, round two (issue 14 item 3): held-out "
                   "distributions x --sdes x --budgets (default 5,10,20), best of ours vs best "
                   "of k-diffusion by FD / floor; --samples per cell (half for D >= 32)")
    p.add_argument("--race-distributions", help="--race2: comma-separated subset of "
                   + ",".join(RACE_DISTRIBUTIONS) + " (held out), or of bench/endpoints.py's "
                   "gauss64,ring8,ring8_thin,mix8d,two_scale (the defaults' tuning set)")
    p.add_argument("--race-seeds", default="1",
                   help="--race2: comma-separated sampler seeds s (each: reference and floor "
                   "sets 100 s + 1, 100 s + 2); the table averages FD / floor over them")
    p.add_argument("--race-only", metavar="REGEX",
                   help="--race2: run only our rows whose label matches (no k-diffusion, no "
                   "converged ODE), to merge with an earlier run of the same seeds")
    p.add_argument("--race-schedules", metavar="DIR",
                   help="--race2: where the schedules fitted on each distribution's moments go "
                   "(default: a temporary folder)")
    p.add_argument("--race-summary-out", metavar="JSON",
                   help="--race2: also write the cells and every row's W/T/L, without the "
                   "per-seed rows (small enough to keep in the repository)")
    p.add_argument("--race-merge", nargs="+", metavar="RACE_JSON",
                   help="--race2: run nothing, merge the rows of earlier --out files (seeds "
                   "run in parallel processes) into one table")
    p.add_argument("--check-extra", action="store_true",
                   help="only check that k-diffusion's sampling module imports, and exit")
    return p.parse_args(argv)


#: Metrics of each problem's summary, lower is better.
SUMMARY_METRICS = {"gauss64": ("fd", "fd_whitened"), "mixture2d": ("fd", "mode_tv", "off_mode")}


def summarize(results: dict) -> int:
    """Print the best-of-ours vs best-of-k-diffusion tables of a results JSON (--out)."""
    rows = [Row(**r) for r in results["matched"]]
    budgets = [b for b in results["settings"]["budgets"] if b <= 20]
    for problem, metrics in SUMMARY_METRICS.items():
        sub = [r for r in rows if r.problem == problem]
        if sub:
            print(f"\n## {problem}: best of ours vs best of k-diffusion at <= 20 NFE\n")
            print(best_table(sub, budgets, metrics))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.summarize:
        return summarize(json.loads(Path(args.summarize).read_text()))
    ks, k_note = load_k_diffusion()
    if args.check_extra:
        print("k_diffusion.sampling: OK" if ks else k_note)
        return 0 if ks else 1
    if args.race2:
        return race_two(args, ks)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype)
    if args.overhead:
        budgets = tuple(int(b) for b in (args.budgets or "10,20,50").split(",") if b)
        shape = (args.samples, DIM)
        rows = overhead_comparison(ks, shape, getattr(torch, args.dtype), device, budgets,
                                   args.rounds)
        print(f"# overhead: trivial model, batch {shape}, {args.dtype}, {torch.get_num_threads()}"
              f" thread(s), budgets {budgets}, median of {args.rounds} interleaved rounds"
              + ("" if ks is not None else f"; {k_note}"))
        print(overhead_comparison_table(rows))
        if args.out:
            Path(args.out).write_text(json.dumps(dict(machine=machine_description(), rows=rows),
                                                 indent=1))
        return 0
    N = 100 if args.quick else 1000
    ald_steps_each = 100                    # NCSN's 10 levels x 100 steps in both modes
    budgets = (5, 10, 20) if args.quick else (5, 10, 20, 50, 100)
    if args.budgets:
        budgets = tuple(int(b) for b in args.budgets.split(",") if b)
    n_points = 32 if args.quick else 128
    tol = 1e-5
    sde_names = [s for s in args.sdes.split(",") if s]
    for s in sde_names:
        if s not in SDES:
            raise SystemExit(f"unknown SDE {s!r}; valid: {', '.join(SDES)}")

    problem_names = [p for p in args.problems.split(",") if p]
    for p in problem_names:
        if p not in PROBLEMS:
            raise SystemExit(f"unknown problem {p!r}; valid: {', '.join(PROBLEMS)}")
    dist = sde_lib.spread_gaussian(DIM)
    shape = (args.samples, DIM)
    reference = Reference(dist, dist.sample(args.samples, dtype=F64,
                                            generator=torch.Generator().manual_seed(100)))
    second = dist.sample(args.samples, generator=torch.Generator().manual_seed(101), dtype=F64)
    floor = frechet_distance(second, reference.x)
    floor_whitened = frechet_distance(reference.whiten(second), reference.xw)
    mixture = sde_lib.eight_mode_mixture()
    mix_shape = (args.mixture_samples, 2)
    mix_reference = MixtureReference(mixture, mixture.sample(
        args.mixture_samples, dtype=F64, generator=torch.Generator().manual_seed(100)))
    mix_floors = mix_reference.scores(mixture.sample(
        args.mixture_samples, generator=torch.Generator().manual_seed(101), dtype=F64))
    settings = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                    machine=machine_description(),
                    torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
                    dtype=args.dtype, samples=args.samples, dim=DIM, N=N, quick=args.quick,
                    mixture_samples=args.mixture_samples, problems=problem_names,
                    ald_steps_each=ald_steps_each, budgets=list(budgets), sample_eps=SAMPLE_EPS,
                    likelihood_eps=LIKELIHOOD_EPS, likelihood_points=n_points, likelihood_tol=tol,
                    sdes={s: repr(SDES[s](N)) for s in sde_names},
                    k_diffusion=getattr(sys.modules.get("k_diffusion.sampling"), "__file__", None))
    print("# settings: " + json.dumps(settings))
    print(f"# gauss64 floor (FD between two independent true sample sets of {args.samples}): "
          f"{floor:.4f}, whitened {floor_whitened:.3f}")
    print(f"# mixture2d floors (an independent true set of {args.mixture_samples}): FD "
          f"{mix_floors['fd']:.4f}, mode TV {mix_floors['mode_tv']:.3f}, off-mode "
          f"{100 * mix_floors['off_mode']:.2f}%")
    notes = []
    if ks is None:
        notes.append(k_note)
    for note in notes:
        print(f"# note: {note}")

    results = dict(settings=settings, floor=floor, floor_whitened=floor_whitened,
                   mixture_floors=mix_floors, standard=[], matched=[], likelihood=[], notes=notes)
    problems = {"gauss64": (dist, shape, reference,
                            f"FD / whitened FD (NFE); floors {floor:.4f} / {floor_whitened:.2f}",
                            ("fd", "fd_whitened")),
                "mixture2d": (mixture, mix_shape, mix_reference,
                              f"FD / mode TV / off-mode % (NFE); floors {mix_floors['fd']:.4f} / "
                              f"{mix_floors['mode_tv']:.3f} / {100 * mix_floors['off_mode']:.2f}",
                              ("fd", "mode_tv", "off_mode"))}
    for problem in problem_names:
        pdist, pshape, pref, legend, metrics = problems[problem]
        problem_matched = []
        for sde_name in sde_names:
            make_sde = SDES[sde_name]
            cases, matched = our_cases(pdist, make_sde, N, ald_steps_each, pshape, dtype, device,
                                       budgets)
            rows = [] if args.no_standard else [
                measure(c, sde_name, pref, device, seed=1, problem=problem) for c in cases]
            if rows:
                print(f"\n## {problem}, {sde_name}: standard setting (N={N})\n")
                print(sampling_table(rows), flush=True)
            if ks is not None:
                matched += k_cases(ks, pdist, make_sde(N), pshape, dtype, device, budgets)
            matched_rows = [measure(c, sde_name, pref, device, seed=1, problem=problem)
                            for c in matched]
            for r in matched_rows:     # the step counts above are chosen to stay within budget
                if r.nfe is not None and r.nfe > r.budget:
                    print(f"# WARNING: {r.sampler} ({r.family}) made {r.nfe} NFE > budget "
                          f"{r.budget}")
            print(f"\n## {problem}, {sde_name}: matched NFE budgets, {legend}\n")
            print(matched_table(matched_rows, budgets))
            print(f"\n{sampling_table(matched_rows)}", flush=True)
            results["standard"] += [asdict(r) for r in rows]
            results["matched"] += [asdict(r) for r in matched_rows]
            problem_matched += matched_rows
        if ks is not None:
            small = [b for b in budgets if b <= 20]
            print(f"\n## {problem}: best of ours vs best of k-diffusion at <= 20 NFE\n")
            print(best_table(problem_matched, small, metrics), flush=True)

    all_rows = [Row(**r) for r in results["standard"] + results["matched"]]
    print(f"\n## overhead with a trivial score, batch {shape}, {args.dtype} (gauss64 runs)\n")
    print(overhead_table([r for r in all_rows if r.problem == "gauss64"]), flush=True)

    if not args.no_likelihood and "gauss64" in problem_names:
        for sde_name in sde_names:
            results["likelihood"] += likelihood_rows(ks, dist, sde_name, SDES[sde_name](N),
                                                     n_points, tol, device)
        print(f"\n## log-likelihood vs the true log p_eps(x), eps={LIKELIHOOD_EPS}, "
              f"{n_points} points, float64, dopri5 rtol=atol={tol}\n")
        print(likelihood_table(results["likelihood"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\n# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
