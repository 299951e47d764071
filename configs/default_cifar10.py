"""Shared default for CIFAR-10 (32x32x3, 50,000 training / 10,000 test images), with the
hyperparameters of the official Score SDE code (Song et al. 2021, App. D and its
configs/default_cifar10_configs.py): Adam lr 2e-4 with 5000 warm-up steps, gradient clipping
at 1, batch 128, 1.3M steps, dropout 0.1, seed 42, data in [0, 1] (VE runs; VP / sub-VP
variants centre it), random flips.

The data is read from the standard python archive cifar-10-python.tar.gz in data.data_dir;
with data.download=True it is fetched there when missing (run_lib.datasets.load_cifar10).
"""
import ml_collections

from configs.common import (classifier_group, eval_group, inpaint_group, optim_group,
                            sampling_group, sde_group, training_group)


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.device = "auto"          # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"
    data.data_dir = "data"
    data.download = False           # True: fetch cifar-10-python.tar.gz (md5-checked) if missing
    data.image_size = 32
    data.num_channels = 3
    data.centered = False           # pixels in [0, 1]; networks see 2x - 1 (models.get_score_fn)
    data.random_flip = True
    data.dequantize = False         # uniform dequantization is applied for bits/dim only

    config.sde = sde_group(sigma_max=50.0)   # Song & Ermon 2020, technique 1, for CIFAR-10
    config.model = model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.num_classes = 0           # > 0: class-conditional (labels of the data set)
    model.learn_sigma = False       # Improved DDPM's variance head [eps, v] (mlp, ddpm, ncsnpp)
    model.checkpointing = False     # activation checkpointing of the blocks (ddpm, ncsnpp, ncsn*)
    model.ema_rate = 0.9999
    model.ema_warmup = False        # the papers' plain EMA (runs of 1.3M steps)
    model.dropout = 0.1

    config.training = training = training_group(n_iters=1_300_001, batch_size=128, log_freq=50)
    training.snapshot_freq = 50_000
    training.snapshot_freq_for_preemption = 10_000
    config.optim = optim = optim_group(warmup=5000)
    optim.lr = 2e-4

    config.sampling = sampling = sampling_group(num_samples=64)
    sampling.batch_size = 0         # images per sampler call (0: all at once)
    # likelihood_samples 0: all 10,000 test images
    config.eval = eval_group(likelihood_samples=0, batch_size=500, trace="hutchinson")
    # the Score SDE paper's noise-conditional WRN-28-10 classifier (App. I.1) for guidance
    config.classifier = classifier_group(
        name="wideresnet", num_classes=10, depth=28, widen_factor=10, embedding_dim=128,
        fourier_scale=16.0, n_iters=100_000, batch_size=128, lr=2e-4,
        eval_sigmas=(0.05, 0.1, 0.25, 0.5))
    config.classifier.ema_rate = 0.9999
    config.classifier.warmup = 1000
    config.classifier.log_freq = 500
    config.classifier.snapshot_freq = 25_000
    config.classifier.snapshot_freq_for_preemption = 5000
    config.classifier.eval_freq = 5000
    # --mode inpaint (run_lib.inverse): inpaint, colorize or super-resolve test images
    config.inpaint = inpaint_group(num_images=16)
    return config


def ncsnpp_model(model: ml_collections.ConfigDict, *, num_res_blocks: int, fir: bool,
                 progressive_input: str, embedding_type: str, scale_by_sigma: bool,
                 ema_rate: float) -> None:
    """Fill ``model`` with the NCSN++ / DDPM++ architecture of the Score SDE CIFAR-10 configs
    (NCSN++: FIR resampling, residual progressive input, Fourier embedding of log sigma;
    DDPM++: no FIR, no progressive growing, positional embedding of 999 t; both: BigGAN
    residual blocks with skip rescaling, 128 channels, ch_mult (1, 2, 2, 2), attention at 16x16;
    num_res_blocks 4, or 8 for the deep variants)."""
    model.name = "ncsnpp"
    model.scale_by_sigma = scale_by_sigma
    model.ema_rate = ema_rate
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = fir
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = progressive_input
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = embedding_type
    model.fourier_scale = 16.0
    model.conv_size = 3
