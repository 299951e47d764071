"""Forward SDEs of score-based diffusion models (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", Sec. 3.4 and App. B).

Every SDE here is linear, ``dx = f(t) x dt + g(t) dw``, so the perturbation kernel is
Gaussian: ``x_t | x_0 ~ N(alpha(t) x_0, std(t)^2 I)``. Each class holds only this math;
samplers, losses and score wrappers use the shared interface:

    sde(x, t)             -> (drift, diffusion)      drift like x, diffusion (B,)
    marginal_coeffs(t)    -> (alpha, std)            (B,) each, float64
    marginal_prob(x, t)   -> (alpha * x, std)        in x's dtype
    log_snr(t), t_from_log_snr(lam)                  lambda(t) = log(alpha^2 / std^2)
    prior_sampling(shape, ...), prior_logp(z)
    discretize(x, t)      -> (f, G)                  one step of the forward Markov chain
    reverse(x, t, score, probability_flow=False)     the reverse-time SDE / ODE

Times ``t`` are (B,) tensors (or scalars) in [0, T]; schedules are evaluated in float64
and cast to the data's dtype, so float32 and float64 inputs keep their dtype and device.
"""
from __future__ import annotations

import abc
import math

import torch

from .utils import SCHEDULE_DTYPE, append_dims, batch_time, check_int, check_real

__all__ = ["SDE", "VPSDE", "subVPSDE", "VESDE", "reverse_drift"]


def reverse_drift(drift: torch.Tensor, diffusion: torch.Tensor, score: torch.Tensor, *,
                  probability_flow: bool = False) -> torch.Tensor:
    """Drift of the reverse-time process, shared by every sampler and the likelihood.

    Reverse SDE (Song et al. 2021, eq. 6):          f(x, t) - g(t)^2 * score
    Probability-flow ODE (Song et al. 2021, eq. 13): f(x, t) - g(t)^2 * score / 2

    Works for the continuous (f, g) of ``sde.sde`` and for the discrete (f_i, G_i) of
    ``sde.discretize`` alike (the latter gives the reverse-diffusion predictor, eq. 47).

    Args:
        drift: forward drift, shape (B, ...).
        diffusion: forward diffusion coefficient, shape (B,).
        score: grad_x log p_t(x), shape (B, ...).
        probability_flow: use the ODE (factor 1/2) instead of the reverse SDE.
    """
    factor = 0.5 if probability_flow else 1.0
    return drift - append_dims(factor * diffusion ** 2, score.ndim) * score


class SDE(abc.ABC):
    """A linear forward SDE ``dx = f(t) x dt + g(t) dw`` on t in [0, T], with N discrete steps.

    Subclasses define the schedule (``sde``, ``marginal_coeffs``, ``log_snr``,
    ``t_from_log_snr``) and may override ``discretize`` with a special Markov chain.
    """

    #: End time of the diffusion; all SDEs here run on [0, 1].
    T: float = 1.0
    #: Standard deviation of the Gaussian prior N(0, prior_std^2 I) at time T.
    prior_std: float = 1.0
    #: How a score network is told the noise level, in the Score SDE convention that
    #: ``models.get_score_fn`` follows: "time" (the network sees t, or the chain level i, and
    #: predicts the noise) or "sigma" (it sees std(t), or the NCSN label, and outputs the score).
    network_conditioning: str = "time"
    #: True when alpha(t) = 1 for every t, i.e. x_t = x_0 + std(t) z: the perturbation is a
    #: noise level sigma = std(t) alone (VE / NCSN), which annealed Langevin dynamics needs.
    keeps_data_scale: bool = False

    def __init__(self, N: int):
        self.N = check_int("N (the number of discretization steps)", N, 1)

    # ----- the schedule -------------------------------------------------------------------
    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape (B,)) in x's dtype."""

    @abc.abstractmethod
    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t) and std(t) of the kernel x_t | x_0 ~ N(alpha x_0, std^2 I); (B,) float64."""

    @abc.abstractmethod
    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(alpha(t)^2 / std(t)^2), strictly decreasing in t; float64.

        For every linear SDE d(lambda)/dt = -g(t)^2 / std(t)^2, which the likelihood-weighted
        loss uses for importance sampling (Kingma et al. 2021, "Variational Diffusion Models").
        """

    @abc.abstractmethod
    def t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The inverse of ``log_snr``: the time t (float64) at which lambda(t) = lam."""

    def marginal_prob(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean alpha(t) * x (shape of x) and std(t) (shape (B,)) of p_t(x_t | x_0 = x)."""
        t = batch_time(t, x)
        alpha, std = self.marginal_coeffs(t)
        return append_dims(alpha.to(x.dtype), x.ndim) * x, std.to(x.dtype)

    def _schedule_time(self, t) -> torch.Tensor:
        """t as a float64 tensor (the dtype schedules are evaluated in)."""
        return torch.as_tensor(t).to(SCHEDULE_DTYPE)

    # ----- the prior ----------------------------------------------------------------------
    def prior_sampling(self, shape, generator: torch.Generator | None = None,
                       device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Draw x_T ~ N(0, prior_std^2 I) of the given shape (B, ...)."""
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, device=device,
                        dtype=dtype or torch.get_default_dtype())
        return z * self.prior_std

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density (nats) of the prior N(0, prior_std^2 I) at z (B, ...); returns (B,)."""
        dim = z[0].numel()
        var = self.prior_std ** 2
        sq = z.reshape(z.shape[0], -1).square().sum(dim=1)
        return -0.5 * dim * math.log(2 * math.pi * var) - sq / (2 * var)

    # ----- capabilities -------------------------------------------------------------------
    @property
    def has_discrete_chain(self) -> bool:
        """Whether the SDE has a discrete Markov chain with closed-form marginals
        (``discrete_marginal_coeffs``: DDPM's for VP, SMLD's for VE), which the discrete
        losses, discrete score networks and the ancestral predictor need."""
        return False

    def langevin_step_factor(self, t: torch.Tensor) -> torch.Tensor:
        """The factor alpha_i of the Langevin corrector (Song et al. 2021, Alg. 4-5): the
        squared signal decay over one chain step, (alpha(t) / alpha(t - T/N))^2. It is
        ~1 - beta_i for VP and sub-VP (Alg. 5) and exactly 1 for VE (Alg. 4).
        t: (B,) times; returns (B,) float64."""
        t = self._schedule_time(t)
        alpha, _ = self.marginal_coeffs(t)
        alpha_before, _ = self.marginal_coeffs((t - self.T / self.N).clamp(min=0.0))
        return (alpha / alpha_before) ** 2

    # ----- the discrete chain -------------------------------------------------------------
    def time_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index i in {0, ..., N-1} of the discrete level at time t = i * T / (N - 1).

        Rounds to the nearest level (float32 times on the grid land on their own index).
        """
        t = self._schedule_time(t)
        if self.N == 1:
            return torch.zeros(t.shape, dtype=torch.long, device=t.device)
        return torch.round(t * (self.N - 1) / self.T).long().clamp_(0, self.N - 1)

    def index_time(self, i: torch.Tensor) -> torch.Tensor:
        """Time t_i = i * T / (N - 1) (float64) of discrete level i; the inverse of time_index."""
        return i.to(SCHEDULE_DTYPE) * (self.T / max(self.N - 1, 1))

    def discrete_marginal_coeffs(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_i and std_i (float64, shape of i) of the discrete chain after steps 0..i."""
        raise ValueError(
            f"{type(self).__name__} has no discrete Markov chain with closed-form marginals; "
            "use the continuous objective and samplers (continuous=True)"
        )

    def discretize(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """One step x_{i+1} = x_i + f + G z of the forward chain at time t.

        Default: Euler-Maruyama with dt = T / N, f = f(x, t) dt, G = g(t) sqrt(dt).
        Returns f (shape of x) and G (shape (B,)), in x's dtype.
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    # ----- the reverse process ------------------------------------------------------------
    def reverse(self, x: torch.Tensor, t, score: torch.Tensor, *, probability_flow: bool = False,
                discrete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift and diffusion of the reverse-time SDE (eq. 6) or probability-flow ODE (eq. 13).

        Args:
            x: state (B, ...); t: times (B,) or a scalar; score: grad log p_t(x), like x.
            probability_flow: the ODE (its diffusion is returned as zeros).
            discrete: use the discrete chain's (f_i, G_i) instead of (f dt, g): gives the
                reverse-diffusion predictor's update x_{i-1} = x_i - drift + G z.
        """
        f, g = self.discretize(x, t) if discrete else self.sde(x, t)
        drift = reverse_drift(f, g, score, probability_flow=probability_flow)
        return drift, (torch.zeros_like(g) if probability_flow else g)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict:
        return {"N": self.N}


class _TableCache:
    """Float64 lookup tables (discrete schedules) cached per device, so indexing them on
    CUDA does not copy the table from the host at every sampler step."""

    def __init__(self, **tables: torch.Tensor):
        self._tables = {("cpu", name): value for name, value in tables.items()}

    def get(self, name: str, device) -> torch.Tensor:
        key = (str(torch.device(device)), name)
        if key not in self._tables:
            self._tables[key] = self._tables[("cpu", name)].to(device)
        return self._tables[key]


class _LinearBetaSDE(SDE):
    """The linear noise rate beta(t) = beta_min + t (beta_max - beta_min) of VP and sub-VP,
    with B(t) = int_0^t beta and its inverse; subclasses give the diffusion and marginals."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        self.beta_min = check_real("beta_min", beta_min, minimum=0.0)
        self.beta_max = check_real("beta_max", beta_max, minimum=0.0, strict=True)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_min={beta_min}, "
                             f"beta_max={beta_max}")

    def _params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, "N": self.N}

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min), float64."""
        return self.beta_min + self._schedule_time(t) * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2, float64."""
        t = self._schedule_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def _time_from_integrated_beta(self, b: torch.Tensor) -> torch.Tensor:
        """Solve B(t) = b for t >= 0 (the stable root of the quadratic)."""
        slope = self.beta_max - self.beta_min
        denominator = self.beta_min + torch.sqrt(self.beta_min ** 2 + 2 * slope * b)
        return torch.where(b > 0, 2 * b / denominator.clamp(min=1e-300), torch.zeros_like(b))

    def _drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = -beta(t) x / 2, shared by VP and sub-VP."""
        return -0.5 * append_dims(self.beta(t).to(x.dtype), x.ndim) * x


class _VPKernel:
    """The kernel of every VP SDE from its integrated rate B(t) = int_0^t beta (subclasses
    give ``integrated_beta`` and its inverse ``_time_from_integrated_beta``):
    alpha = exp(-B/2), std^2 = 1 - exp(-B) (Song et al. 2021, eq. 29/33)."""

    def marginal_coeffs(self, t):
        b = self.integrated_beta(t)
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def log_snr(self, t):
        # alpha^2 / std^2 = 1 / (exp(B) - 1)
        return -torch.log(torch.expm1(self.integrated_beta(t)))

    def t_from_log_snr(self, lam):
        # exp(B) - 1 = exp(-lam)  =>  B = log(1 + exp(-lam)) (softplus, without its cut-off)
        lam = torch.as_tensor(lam).to(SCHEDULE_DTYPE)
        return self._time_from_integrated_beta(torch.logaddexp(torch.zeros_like(lam), -lam))


class _DDPMChain:
    """DDPM's Markov chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z, i = 0..N-1, from a
    table of betas (float64): the discrete marginals and the forward step shared by every VP
    SDE with a discrete chain (``VPSDE``, ``schedules.VPScheduleSDE``). Level i sits at time
    t_i = i T / (N - 1) (``SDE.time_index``)."""

    def _set_ddpm_chain(self, betas: torch.Tensor) -> None:
        #: beta_i of the chain, (N,) float64.
        self.discrete_betas = betas
        #: alpha_bar_i = prod_{j <= i} (1 - beta_j) (Ho et al. 2020, eq. 4), (N,) float64.
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._tables = _TableCache(betas=betas, alphas_cumprod=self.alphas_cumprod)

    def _check_ddpm_chain(self) -> None:
        """A ValueError when the chain does not exist (all betas must be < 1)."""

    def discrete_marginal_coeffs(self, i):
        self._check_ddpm_chain()
        abar = self._tables.get("alphas_cumprod", i.device)[i]
        return torch.sqrt(abar), torch.sqrt(1.0 - abar)

    def discretize(self, x, t):
        """DDPM step x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z (Ho et al. 2020, eq. 2)."""
        self._check_ddpm_chain()
        t = batch_time(t, x)
        beta = self._tables.get("betas", x.device)[self.time_index(t)]
        f = append_dims((torch.sqrt(1.0 - beta) - 1.0).to(x.dtype), x.ndim) * x
        return f, torch.sqrt(beta).to(x.dtype)


class VPSDE(_VPKernel, _DDPMChain, _LinearBetaSDE):
    """Variance-preserving SDE, the continuous limit of DDPM (Ho et al. 2020):

        dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,   beta(t) = beta_min + t (beta_max - beta_min)

    alpha(t) = exp(-B(t)/2), std(t)^2 = 1 - exp(-B(t)) with B(t) = int_0^t beta (Song et al.
    2021, eq. 29/33). The discrete chain is DDPM's with beta_i = beta(t_i) / N, i = 0..N-1.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(beta_min, beta_max, N)
        self._set_ddpm_chain(torch.linspace(self.beta_min / self.N, self.beta_max / self.N,
                                            self.N, dtype=SCHEDULE_DTYPE))

    @property
    def has_discrete_chain(self) -> bool:
        """DDPM's chain exists while its largest beta, beta_max / N, is below 1."""
        return self.beta_max / self.N < 1.0

    def sde(self, x, t):
        t = batch_time(t, x)
        return self._drift(x, t), torch.sqrt(self.beta(t)).to(x.dtype)

    def _check_ddpm_chain(self) -> None:
        if not self.has_discrete_chain:
            raise ValueError(f"{self!r}: the DDPM chain's largest beta, beta_max / N = "
                             f"{self.beta_max / self.N:.3g}, must be < 1; use N > beta_max or a "
                             "continuous sampler / loss")


class subVPSDE(_LinearBetaSDE):
    """Sub-VP SDE (Song et al. 2021, eq. 34): the VP drift with a smaller diffusion,

        dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dw,

    whose kernel has alpha(t) = exp(-B/2) and std(t) = 1 - exp(-B), below the VP std.
    It has no special chain: ``discretize`` is the Euler-Maruyama step of ``SDE``.
    """

    def sde(self, x, t):
        t = batch_time(t, x)
        diffusion = torch.sqrt(self.beta(t) * -torch.expm1(-2.0 * self.integrated_beta(t)))
        return self._drift(x, t), diffusion.to(x.dtype)

    def marginal_coeffs(self, t):
        b = self.integrated_beta(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def log_snr(self, t):
        # alpha^2 / std^2 = exp(-B) / (1 - exp(-B))^2
        b = self.integrated_beta(t)
        return -b - 2.0 * torch.log(-torch.expm1(-b))

    def t_from_log_snr(self, lam):
        # With u = exp(B): (u - 1)^2 / u = c := exp(-lam), so u - 1 = (c + sqrt(c^2 + 4c)) / 2.
        c = torch.exp(-torch.as_tensor(lam).to(SCHEDULE_DTYPE))
        b = torch.log1p(0.5 * (c + torch.sqrt(c * (c + 4.0))))
        return self._time_from_integrated_beta(b)


class VESDE(SDE):
    """Variance-exploding SDE, the continuous limit of NCSN/SMLD (Song & Ermon 2019):

        dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw,
        sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    alpha(t) = 1 and std(t) = sigma(t): as in NCSN and the Score SDE code, p_0 is the data
    smoothed at sigma_min, and the SDE carries N(0, sigma(s)^2) exactly to N(0, sigma(t)^2).
    The discrete chain is SMLD's over sigma_1 < ... < sigma_N (geometric), with steps
    G_i = sqrt(sigma_i^2 - sigma_{i-1}^2) and sigma_0 := 0.
    """

    network_conditioning = "sigma"
    keeps_data_scale = True

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min = check_real("sigma_min", sigma_min, minimum=0.0, strict=True)
        self.sigma_max = check_real("sigma_max", sigma_max, minimum=0.0, strict=True)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        sigmas = torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max),
                                          self.N, dtype=SCHEDULE_DTYPE))
        self.discrete_sigmas = sigmas
        self._tables = _TableCache(sigmas=sigmas)

    def _params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}

    @property
    def has_discrete_chain(self) -> bool:
        return True

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t, float64."""
        return self.sigma_min * torch.exp(self._schedule_time(t) * self._log_ratio)

    def sde(self, x, t):
        t = batch_time(t, x)
        diffusion = self.sigma(t) * math.sqrt(2.0 * self._log_ratio)
        return torch.zeros_like(x), diffusion.to(x.dtype)

    def marginal_coeffs(self, t):
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma

    def log_snr(self, t):
        return -2.0 * torch.log(self.sigma(t))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam).to(SCHEDULE_DTYPE)
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def discrete_marginal_coeffs(self, i):
        sigma = self._tables.get("sigmas", i.device)[i]
        return torch.ones_like(sigma), sigma

    def discretize(self, x, t):
        """SMLD step x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z (Song et al. 2021, eq. 45)."""
        t = batch_time(t, x)
        i = self.time_index(t)
        sigmas = self._tables.get("sigmas", x.device)
        previous = torch.where(i > 0, sigmas[(i - 1).clamp(min=0)], torch.zeros_like(sigmas[i]))
        G = torch.sqrt(sigmas[i] ** 2 - previous ** 2)
        return torch.zeros_like(x), G.to(x.dtype)
