"""Shared default for the 2-D toy data (a Gaussian mixture with a closed-form score)."""
import ml_collections


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.device = "auto"          # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...

    config.data = data = ml_collections.ConfigDict()
    data.name = "eight_modes"       # one of sde_lib.TOY_DISTRIBUTIONS
    data.dim = 2

    config.sde = sde = ml_collections.ConfigDict()
    sde.name = "vpsde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01
    sde.sigma_max = 5.0             # ~ the largest distance between two data points
    sde.num_scales = 1000

    config.model = model = ml_collections.ConfigDict()
    model.name = "mlp"
    model.hidden_dim = 128
    model.num_blocks = 3
    model.embedding_type = "positional"
    model.embedding_dim = 64
    model.fourier_scale = 1.0      # log sigma spans ~6 units on this data; 16 (NCSN++) trains slower
    model.scale_by_sigma = False
    model.num_classes = 0

    config.training = training = ml_collections.ConfigDict()
    training.n_iters = 2000
    training.batch_size = 512
    training.continuous = True
    training.reduce_mean = False
    training.likelihood_weighting = False
    training.importance_sampling = False
    training.eps = 1e-5
    training.log_freq = 200

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-3
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 100
    optim.grad_clip = 1.0

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"          # pc | ald | ode (main.py --sampler overrides it)
    sampling.num_samples = 4096
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
    sampling.algorithm = "dpmsolver++"   # also dpm_adaptive (order 2 or 3; rtol, atol above)
    sampling.edm_spacing = "karras"  # edm: sigma schedule (Karras et al. 2022 eq. 5 with rho)
    sampling.rho = 7.0
    sampling.s_churn = 0.0           # edm: 0 deterministic Heun; > 0 stochastic churn
    sampling.s_tmin = 0.0            # edm: churn only for sigma in [s_tmin, s_tmax]
    sampling.s_tmax = float("inf")
    sampling.s_noise = 1.0

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.num_samples = 8192     # samples for the score error against the exact score
    evaluate.eps = 1e-3             # smallest time of the score error
    evaluate.likelihood_samples = 1024
    evaluate.likelihood_eps = 1e-5  # the ODE starts at eps; logp is that of p_eps
    evaluate.trace = "exact"        # exact | hutchinson
    evaluate.probes = 1
    return config
