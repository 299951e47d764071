"""Shared default for the 2-D toy data (a Gaussian mixture with a closed-form score), trained
by the same loop as images (run_lib.train): the data set is run_lib.datasets.MixtureDataset,
whose closed-form density adds exact evaluations (score error, true NLL, mode weights)."""
import ml_collections

from configs.common import (classifier_group, eval_group, optim_group, sampling_group,
                            sde_group, training_group)


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.device = "auto"          # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...

    config.data = data = ml_collections.ConfigDict()
    data.name = "eight_modes"       # one of sde_lib.TOY_DISTRIBUTIONS
    data.dim = 2
    data.train_size = 50_000        # points drawn from the mixture (fixed seeds) per split
    data.test_size = 5_000

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
    model.learn_sigma = False       # Improved DDPM's variance head [eps, v] (mlp, ddpm, ncsnpp)
    model.checkpointing = False     # activation checkpointing of the blocks (ddpm, ncsnpp, ncsn*)
    model.ema_rate = 0.999
    model.ema_warmup = True         # decay min(ema_rate, (1 + n) / (10 + n)): suits short runs

    config.training = training = training_group(n_iters=2000, batch_size=512, log_freq=200)
    training.snapshot_freq = 1000               # checkpoints/checkpoint_<step>.pt
    training.snapshot_freq_for_preemption = 500  # checkpoints/latest.pt (resume point)
    training.eval_freq = 500        # EMA test loss and relative score error
    training.eval_batches = 4       # 4 x 512 test points
    training.sample_freq = 2000     # scatter plot of the EMA weights' samples
    training.num_grid_samples = 1024
    config.optim = optim_group(warmup=100)
    config.sampling = sampling_group(num_samples=4096)
    config.sampling.batch_size = 0  # samples per sampler call (0: all at once)

    config.eval = evaluate = eval_group(likelihood_samples=1024, batch_size=0, trace="exact")
    evaluate.score_error_samples = 8192  # draws of the relative score error (training evals)
    evaluate.score_error_eps = 1e-3      # smallest time of the score error
    # noise-conditional classifier of the mixture component (--mode train_classifier)
    config.classifier = classifier_group(
        name="mlp", num_classes=8, hidden_dim=128, num_blocks=2, embedding_dim=64,
        fourier_scale=1.0, n_iters=1000, batch_size=512, lr=3e-3,
        eval_sigmas=(0.1, 0.5, 1.0, 2.0))
    return config
