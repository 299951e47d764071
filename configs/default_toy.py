"""Shared default for the 2-D toy data (a Gaussian mixture with a closed-form score)."""
import ml_collections

from configs.common import optim_group, sampling_group, sde_group, training_group


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.device = "auto"          # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...

    config.data = data = ml_collections.ConfigDict()
    data.name = "eight_modes"       # one of sde_lib.TOY_DISTRIBUTIONS
    data.dim = 2

    config.sde = sde_group(sigma_max=5.0)   # ~ the largest distance between two data points

    config.model = model = ml_collections.ConfigDict()
    model.name = "mlp"
    model.hidden_dim = 128
    model.num_blocks = 3
    model.embedding_type = "positional"
    model.embedding_dim = 64
    model.fourier_scale = 1.0      # log sigma spans ~6 units on this data; 16 (NCSN++) trains slower
    model.scale_by_sigma = False
    model.num_classes = 0

    config.training = training_group(n_iters=2000, batch_size=512, log_freq=200)
    config.optim = optim_group(warmup=100)
    config.sampling = sampling_group(num_samples=4096)

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.num_samples = 8192     # samples for the score error against the exact score
    evaluate.eps = 1e-3             # smallest time of the score error
    evaluate.likelihood_samples = 1024
    evaluate.likelihood_eps = 1e-5  # the ODE starts at eps; logp is that of p_eps
    evaluate.trace = "exact"        # exact | hutchinson
    evaluate.probes = 1
    return config
