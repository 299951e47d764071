"""VP SDEs given by their noise schedule: the cosine schedule of improved DDPM and a linear
log-SNR schedule (Variational Diffusion Models).

A VP SDE is fixed by its signal decay alpha_bar(t) = alpha(t)^2 (alpha^2 + std^2 = 1):

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,   beta(t) = -d log alpha_bar / dt,

with the integrated rate B(t) = int_0^t beta = -log alpha_bar(t) (B(0) may be > 0, see
``LinearLogSNRVPSDE``), so that (Song et al. 2021, eq. 29/33, with B in place of the linear
schedule's integral)

    alpha(t) = exp(-B/2),   std(t)^2 = 1 - exp(-B),   lambda(t) = log-SNR = -log(exp(B) - 1).

``VPScheduleSDE`` holds this shared math; a schedule gives B(t), its derivative beta(t), the
inverse of B, and the log alpha_bar its discrete chain discretizes. Every sampler, the ODE
likelihood and the losses see only the ``SDE`` interface and its capabilities
(``has_discrete_chain``, ``network_conditioning = "time"``, ``langevin_step_factor``).

The discrete chain is DDPM's, with the betas of improved DDPM's ``betas_for_alpha_bar``
(Nichol & Dhariwal 2021, Sec. 3.2: eq. 17, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} "clipped
to be no larger than 0.999"; openai/improved-diffusion, ``improved_diffusion/
gaussian_diffusion.py``, ``betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar,
max_beta=0.999)``):

    beta_i = min(1 - alpha_bar(t_{i+1}) / alpha_bar(t_i), max_beta),  t_i = i / N,  i = 0..N-1,
    alphas_cumprod_i = prod_{j <= i} (1 - beta_j),

so the chain's level i has the kernel's alpha_bar((i + 1) / N) wherever no beta was clipped.
Like ``VPSDE``'s chain, level i is labelled with the time i T / (N - 1) (``SDE.time_index``).
"""
from __future__ import annotations

import abc
import math

import torch

from .sdes import SDE, _DDPMChain, _VPKernel
from .utils import SCHEDULE_DTYPE, append_dims, batch_time, check_int, check_real

__all__ = ["VPScheduleSDE", "CosineVPSDE", "LinearLogSNRVPSDE", "betas_for_alpha_bar"]

_HALF_PI = 0.5 * math.pi


def betas_for_alpha_bar(log_alpha_bar, N: int, max_beta: float = 0.999) -> torch.Tensor:
    """The betas (N,) float64 of the DDPM chain that discretizes alpha_bar on [0, 1]
    (improved DDPM's ``betas_for_alpha_bar``): beta_i = min(1 - alpha_bar((i+1)/N) /
    alpha_bar(i/N), max_beta), i = 0..N-1.

    Args:
        log_alpha_bar: t (float64 tensor) -> log alpha_bar(t), non-increasing, -inf allowed
            (the cosine schedule's alpha_bar(1) = 0). The ratio is taken as exp of the
            difference of logs, 1 - ratio = -expm1(...), which is exact to rounding also for
            the tiny betas near t = 0. The chain starts from the data (alpha_bar = 1 before
            step 0): for a schedule with alpha_bar(0) < 1 (LinearLogSNRVPSDE) beta_0 =
            1 - alpha_bar(1/N), so that every level has the kernel's alpha_bar((i+1)/N).
        N: number of steps; max_beta: the clip (the paper's 0.999) that keeps beta_i < 1.
    """
    N = check_int("N (the number of discretization steps)", N, 1)
    t = torch.arange(N + 1, dtype=SCHEDULE_DTYPE) / N
    log_abar = log_alpha_bar(t)
    log_abar[0] = 0.0                          # the chain starts at the data
    betas = -torch.expm1(log_abar[1:] - log_abar[:-1])
    return betas.clamp(max=max_beta)


def _check_max_beta(max_beta) -> float:
    value = check_real("max_beta", max_beta, strict=True)
    if not value < 1.0:
        raise ValueError(f"max_beta must be a number in (0, 1), got {max_beta!r}")
    return value


class VPScheduleSDE(_VPKernel, _DDPMChain, SDE):
    """A VP SDE given by its schedule (see the module docstring); subclasses define

        integrated_beta(t)   B(t) = -log alpha_bar(t), float64
        beta(t)              dB/dt, float64
        _time_from_integrated_beta(b)   the inverse of B (extrapolating past [0, T])
        _chain_log_alpha_bar(t)         the log alpha_bar the DDPM chain discretizes

    and call ``_build_chain()`` once their parameters are set. The prior is N(0, I) (as for
    VPSDE; ``prior_logp`` is the base class's), which replaces the true p_T =
    N(alpha(T) x_0, std(T)^2 I) up to alpha(T) (stated per schedule).
    """

    def __init__(self, N: int, max_beta: float):
        super().__init__(N)
        self.max_beta = _check_max_beta(max_beta)

    def _build_chain(self) -> None:
        self._set_ddpm_chain(betas_for_alpha_bar(self._chain_log_alpha_bar, self.N,
                                                 self.max_beta))

    # ----- the schedule (subclasses) -------------------------------------------------------
    @abc.abstractmethod
    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = -log alpha_bar(t), float64 (shape of t)."""

    @abc.abstractmethod
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = dB/dt (1 / unit time), float64 (shape of t)."""

    @abc.abstractmethod
    def _time_from_integrated_beta(self, b: torch.Tensor) -> torch.Tensor:
        """The time t (float64) with B(t) = b."""

    def _chain_log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_bar(t) that the DDPM chain discretizes; by default the SDE's own."""
        return -self.integrated_beta(t)

    # ----- the shared VP math ---------------------------------------------------------------
    @property
    def has_discrete_chain(self) -> bool:
        """Always: betas_for_alpha_bar clips every beta_i at max_beta < 1."""
        return True

    def sde(self, x, t):
        """f(x, t) = -beta(t) x / 2 (shape of x), g(t) = sqrt(beta(t)) (B,)."""
        t = batch_time(t, x)
        beta = self.beta(t)
        return -0.5 * append_dims(beta.to(x.dtype), x.ndim) * x, torch.sqrt(beta).to(x.dtype)


class CosineVPSDE(VPScheduleSDE):
    """The cosine schedule of improved DDPM (Nichol & Dhariwal 2021, eq. 17; s = 0.008 makes
    sqrt(beta_0) ~ 6.4e-3 just below the pixel bin 1/127.5, Sec. 3.2) as a VP SDE:

        alpha_bar(t) = f(t) / f(0),   f(t) = cos^2(u(t)),   u(t) = (t + s) / (1 + s) * pi / 2,
        beta(t) = -d log alpha_bar / dt = pi / (1 + s) * tan(u(t)),

    which grows without bound as t -> 1 (alpha_bar(1) = 0). As in the paper, where the
    discrete betas are clipped at max_beta = 0.999, the rate is clipped in continuous time at

        beta_clip = -N log(1 - max_beta)     (6908 for N = 1000),

    the rate whose one step of 1/N decays alpha_bar by the factor 1 - max_beta, i.e. the
    paper's clip beta_i <= max_beta at the chain's resolution. beta(t) reaches beta_clip at
    t_clip = 1 - (1 + s) (2 / pi) atan(pi / ((1 + s) beta_clip)) (1 - 2.9e-4 for N = 1000) and
    stays there, so

        B(t) = -log(f(t) / f(0))                         for t <= t_clip,
        B(t) = B(t_clip) + beta_clip (t - t_clip)          for t >  t_clip,

    and alpha_bar(T), std(T), lambda(T) are finite; marginals, log-SNR and its inverse are
    closed forms of this clipped schedule (exact to rounding: the angles near t = 0 and t = 1
    are formed without cancellation). The clip adds ~2 to B over [t_clip, 1] whatever N is;
    for N = 1000, alpha_bar(1) = 2.7e-8 (alpha(T) = 1.7e-4, lambda(T) = -17.4), so the
    prior N(0, I) is the true p_T to that accuracy. The clip depends on N (as the paper's
    does): 1 - t_clip ~ 2 / beta_clip = 0.29 / N, so changing N changes the SDE only within
    the last step, where alpha < alpha(t_clip) ~ 0.45 / N and x_t is nearly pure noise.

    The discrete chain is exactly the paper's: ``betas_for_alpha_bar`` of the unclipped
    alpha_bar with max_beta (for N = 1000 only the last beta, 1 - f(1)/f(0.999) = 1, is
    clipped, to 0.999). Its level i has alpha_bar((i + 1) / N) of the unclipped schedule,
    which is the SDE's at every level but the last ((i + 1) / N = 1 > t_clip): there the chain
    has alpha_bar = (1 - max_beta) alpha_bar(1 - 1/N) (2.4e-9 for N = 1000) and the SDE
    alpha_bar(1) (2.8e-8).

    Args:
        N: number of discretization steps (the chain's length; sets beta_clip).
        s: the offset s > 0 that keeps beta(0) finite and small (the paper's 0.008).
        max_beta: the clip of the discrete betas, in (0, 1) (the paper's 0.999).
    """

    def __init__(self, N: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        super().__init__(N, max_beta)
        self.s = check_real("s", s, strict=True)
        scale = 1.0 + self.s
        self._u0 = self.s / scale * _HALF_PI                # u(0)
        self._cos_u0 = math.cos(self._u0)
        self.beta_clip = -self.N * math.log1p(-self.max_beta)
        # 1 - t_clip = (1 + s) (1 - 2 u_clip / pi) with tan(u_clip) = beta_clip (1 + s) / pi
        self.t_clip = max(1.0 - scale / _HALF_PI * math.atan(math.pi / (scale * self.beta_clip)),
                          0.0)
        self._b_clip = float(self._cosine_integrated_beta(
            torch.tensor(self.t_clip, dtype=SCHEDULE_DTYPE)))
        self._build_chain()

    def _params(self) -> dict:
        return {"N": self.N, "s": self.s, "max_beta": self.max_beta}

    def _cosine_integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """-log(f(t) / f(0)) of the unclipped schedule (+inf at t = 1), float64.

        f(t)/f(0) = (cos u / cos u0)^2. For t <= 1/2 through 1 - cos u / cos u0 =
        2 sin((u + u0)/2) sin((u - u0)/2) / cos u0 (exact for small t), beyond through
        cos u = sin((1 - t) / (1 + s) pi / 2) (exact near t = 1)."""
        t = self._schedule_time(t)
        scale = 1.0 + self.s
        u = (t + self.s) / scale * _HALF_PI
        drop = 2.0 * torch.sin(0.5 * (u + self._u0)) * torch.sin(0.5 * t / scale * _HALF_PI)
        early = -2.0 * torch.log1p(-(drop / self._cos_u0).clamp(max=1.0))
        late = -2.0 * (torch.log(torch.sin((1.0 - t).clamp(min=0.0) / scale * _HALF_PI))
                       - math.log(self._cos_u0))
        return torch.where(t <= 0.5, early, late)

    def _chain_log_alpha_bar(self, t):
        """The paper's unclipped alpha_bar (the chain clips its betas itself)."""
        return -self._cosine_integrated_beta(t)

    def integrated_beta(self, t):
        """B(t) of the clipped schedule (class docstring), float64."""
        t = self._schedule_time(t)
        clipped = self._b_clip + self.beta_clip * (t - self.t_clip)
        return torch.where(t <= self.t_clip, self._cosine_integrated_beta(t.clamp(max=self.t_clip)),
                           clipped)

    def beta(self, t):
        """min(pi / (1 + s) tan(u(t)), beta_clip), float64; tan u = cot((1 - t)/(1 + s) pi/2)."""
        t = self._schedule_time(t)
        v = (1.0 - t).clamp(min=0.0) / (1.0 + self.s) * _HALF_PI      # pi / 2 - u
        rate = math.pi / (1.0 + self.s) * torch.cos(v) / torch.sin(v)
        return torch.where(t <= self.t_clip, rate, torch.full_like(t, self.beta_clip))

    def _time_from_integrated_beta(self, b):
        """Invert B: below B(t_clip), with d = u - u0 and D = cos u0 - cos u = -cos(u0)
        expm1(-B/2), w = tan(d/2) solves (2 cos u0 - D) w^2 + 2 sin(u0) w - D = 0, whose root
        w = D / (sin u0 + sqrt(sin^2 u0 + D (2 cos u0 - D))) has no cancellation (exact also for
        t ~ 1e-12); t = (1 + s) d / (pi/2). Above, the linear piece (extrapolating beyond T)."""
        b = torch.as_tensor(b).to(SCHEDULE_DTYPE)
        sin_u0 = math.sin(self._u0)
        D = -self._cos_u0 * torch.expm1(-0.5 * b.clamp(min=0.0, max=self._b_clip))
        w = D / (sin_u0 + torch.sqrt(sin_u0 ** 2 + D * (2.0 * self._cos_u0 - D)))
        t_cos = 2.0 * torch.atan(w) / _HALF_PI * (1.0 + self.s)
        t_lin = self.t_clip + (b - self._b_clip) / self.beta_clip
        return torch.where(b <= self._b_clip, t_cos, t_lin)


class LinearLogSNRVPSDE(VPScheduleSDE):
    """A VP SDE whose log-SNR is linear in time (the fixed linear schedule of Variational
    Diffusion Models, Kingma et al. 2021, Sec. 3.4/5; google-research/vdm ``model_vdm.py``
    ``NoiseSchedule_FixedLinear``, gamma = -lambda):

        lambda(t) = logsnr_max + t (logsnr_min - logsnr_max),
        alpha(t)^2 = sigmoid(lambda),  std(t)^2 = sigmoid(-lambda),
        B(t) = softplus(-lambda),  beta(t) = (logsnr_max - logsnr_min) sigmoid(-lambda).

    The rate is bounded by the slope logsnr_max - logsnr_min, so nothing is clipped. As with
    VESDE's sigma_min, the kernel at t = 0 is not the identity (alpha(0)^2 =
    sigmoid(logsnr_max)): p_0 is the data perturbed at log-SNR logsnr_max, and the SDE
    carries that exactly to p_t. Defaults: logsnr_max =
    13.3 (VDM's gamma_min = -13.3: std(0) = 1.3e-3, close to VPSDE's std(1e-5) = 1.0e-3) and
    logsnr_min = -10 (alpha(T) = sqrt(sigmoid(-10)) = 6.7e-3, VPSDE's alpha(1) = 6.6e-3, so
    the N(0, I) prior is as good as VPSDE's; VDM's gamma_max = 5, i.e. logsnr_min = -5, would
    leave alpha(T) = 0.08, which VDM pays for in its prior KL term).

    The discrete chain is ``betas_for_alpha_bar`` of alpha_bar = sigmoid(lambda), started
    from the data (beta_0 = 1 - alpha_bar(1/N)), so level i has the kernel's
    alpha_bar((i + 1) / N) exactly (max_beta = 0.999 never binds for N >= 4 with the
    defaults: every beta_i <= 1 - exp(-(logsnr_max - logsnr_min) / N)).

    Args:
        logsnr_min: lambda(T) (< logsnr_max); logsnr_max: lambda(0); N: discretization steps.
    """

    def __init__(self, logsnr_min: float = -10.0, logsnr_max: float = 13.3, N: int = 1000):
        super().__init__(N, 0.999)
        self.logsnr_min = check_real("logsnr_min", logsnr_min, minimum=None)
        self.logsnr_max = check_real("logsnr_max", logsnr_max, minimum=None)
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"logsnr_min must be < logsnr_max (the log-SNR falls from "
                             f"logsnr_max at t = 0 to logsnr_min at T), got logsnr_min="
                             f"{logsnr_min}, logsnr_max={logsnr_max}")
        self._slope = self.logsnr_max - self.logsnr_min
        self._build_chain()

    def _params(self) -> dict:
        return {"logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max, "N": self.N}

    def log_snr(self, t):
        return self.logsnr_max - self._slope * self._schedule_time(t)

    def t_from_log_snr(self, lam):
        return (self.logsnr_max - torch.as_tensor(lam).to(SCHEDULE_DTYPE)) / self._slope

    def integrated_beta(self, t):
        """B(t) = -log sigmoid(lambda) = softplus(-lambda), float64."""
        lam = self.log_snr(t)
        return torch.logaddexp(torch.zeros_like(lam), -lam)

    def beta(self, t):
        """beta(t) = -d lambda/dt * sigmoid(-lambda), float64."""
        return self._slope * torch.sigmoid(-self.log_snr(t))

    def _time_from_integrated_beta(self, b):
        return self.t_from_log_snr(-torch.log(torch.expm1(torch.as_tensor(b).to(SCHEDULE_DTYPE))))

    def marginal_coeffs(self, t):
        lam = self.log_snr(t)
        return torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))
