"""Shared default for the 8x8 scikit-learn digits (1 channel, 1797 images, 1500 for
training): a tiny DDPM U-Net that trains in a few minutes on a CPU."""
import ml_collections

from configs.toy.default_toy import get_default_configs as _toy_defaults


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.device = "auto"          # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...

    config.data = data = ml_collections.ConfigDict()
    data.name = "digits"            # digits | cifar10 | mnist | folder (run_lib.datasets)
    data.data_dir = "data"          # cifar10, mnist, folder only
    data.download = False
    data.image_size = 8
    data.num_channels = 1
    data.centered = True            # pixels in [-1, 1]
    data.random_flip = None         # None: the data set's default (never for digits)
    data.dequantize = False

    config.sde = sde = ml_collections.ConfigDict()
    sde.name = "vpsde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01
    sde.sigma_max = 10.0            # the largest distance between two training images is 9.6
    sde.num_scales = 1000

    config.model = model = ml_collections.ConfigDict()
    model.name = "ddpm"
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.conditional = True
    model.scale_by_sigma = False
    model.num_classes = 0
    model.ema_rate = 0.999

    config.training = training = ml_collections.ConfigDict()
    training.n_iters = 300
    training.batch_size = 64
    training.continuous = True
    training.reduce_mean = False
    training.likelihood_weighting = False
    training.importance_sampling = False
    training.eps = 1e-5
    training.log_freq = 25
    training.snapshot_freq = 100                # checkpoints/checkpoint_<step>.pt
    training.snapshot_freq_for_preemption = 50  # checkpoints/latest.pt (resume point)

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-3
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 50
    optim.grad_clip = 1.0

    # Sampling and evaluation of image runs are not wired yet (main.py refuses them); the
    # groups carry the toy defaults so that the samplers' options exist when they are.
    toy = _toy_defaults()
    config.sampling = toy.sampling
    config.sampling.num_samples = 64
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.num_samples = 256
    evaluate.eps = 1e-3
    evaluate.likelihood_samples = 256
    evaluate.likelihood_eps = 1e-5
    evaluate.trace = "hutchinson"
    evaluate.probes = 1
    return config
