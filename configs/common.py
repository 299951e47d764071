"""Config groups shared by every data set's default; each default overrides what differs."""
import ml_collections


def sde_group(*, sigma_max: float) -> ml_collections.ConfigDict:
    """VP by default; beta_* for VP / sub-VP, sigma_* for VE (sigma_max ~ the largest distance
    between two data points, Song & Ermon 2020, technique 1)."""
    return ml_collections.ConfigDict(dict(
        name="vpsde", beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=sigma_max,
        num_scales=1000))


def training_group(*, n_iters: int, batch_size: int, log_freq: int) -> ml_collections.ConfigDict:
    """The DSM objective's options (sde_lib.build_loss_fn) and the loop's length and logging."""
    return ml_collections.ConfigDict(dict(
        n_iters=n_iters, batch_size=batch_size, continuous=True, reduce_mean=False,
        likelihood_weighting=False, importance_sampling=False, eps=1e-5, log_freq=log_freq,
        # run_lib.train: 'no' | 'bf16' (autocast of the network forward; fp32 weights and loss)
        mixed_precision="no",
        # sample grids with the EMA weights every sample_freq steps (0: off), fast sampler
        sample_freq=10000, num_grid_samples=64, grid_sampler="dpm_solver",
        # test loss of the EMA weights every eval_freq steps (0: off) on eval_batches batches
        eval_freq=5000, eval_batches=8))


def optim_group(*, warmup: int) -> ml_collections.ConfigDict:
    """Adam with linear warm-up over ``warmup`` steps and gradient-norm clipping."""
    return ml_collections.ConfigDict(dict(
        lr=2e-3, beta1=0.9, eps=1e-8, weight_decay=0.0, warmup=warmup, grad_clip=1.0))


def sampling_group(*, num_samples: int) -> ml_collections.ConfigDict:
    """Options of every sampler of samplers.sample_from_config (main.py --sampler)."""
    sampling = ml_collections.ConfigDict()
    sampling.method = "pc"          # pc | ald | ode | ddim | dpm_solver | edm | dpm_adaptive
    sampling.num_samples = num_samples
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.16
    sampling.n_steps_each = 1       # corrector steps per time step (pc); Langevin steps per level (ald)
    sampling.step_lr = 2e-5         # ald step size at sigma_min
    sampling.noise_removal = True   # final denoising step
    sampling.eps = 1e-3             # last time of the pc and ode samplers
    sampling.ode_method = "dopri5"
    sampling.rtol = 1e-5
    sampling.atol = 1e-5
    sampling.num_steps = 20         # ddim, dpm_solver
    sampling.spacing = "logsnr"     # logsnr | uniform | karras
    sampling.eta = 0.0              # ddim: 0 deterministic, 1 ancestral
    sampling.order = 2              # dpm_solver: 1, 2, 3
    sampling.multistep = True
    sampling.algorithm = "dpmsolver++"   # also dpm_adaptive (order 2 or 3)
    sampling.adaptive_rtol = 0.05    # dpm_adaptive: DPM-Solver's defaults (Lu et al. 2022, App. C),
    sampling.adaptive_atol = 0.0078  # not the ode sampler's 1e-5 (atol ~ 1/128 for data in [-1, 1])
    sampling.edm_spacing = "karras"  # edm: sigma schedule (Karras et al. 2022 eq. 5 with rho)
    sampling.rho = 7.0
    sampling.s_churn = 0.0           # edm: 0 deterministic Heun; > 0 stochastic churn
    sampling.s_tmin = 0.0            # edm: churn only for sigma in [s_tmin, s_tmax]
    sampling.s_tmax = float("inf")
    sampling.s_noise = 1.0
    return sampling
