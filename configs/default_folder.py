"""Shared skeleton of the image-folder configs (config.data.name = "folder": a folder of PNG /
JPEG images, run_lib.datasets.load_image_folder): the data group and the groups every default
has. The data sets' defaults fill in the papers' hyperparameters:
configs/default_celeba.py (CelebA 64) and configs/default_lsun.py (LSUN, CelebA-HQ and FFHQ at
96-1024 px). How to prepare each folder: README.md, section "High-resolution configs".

Per-call batches of sampling and evaluation are not the papers' (they sampled on TPU pods):
the same number of pixels per call as 512 CIFAR-10 images (256 px: 8, 1024 px: 1).
"""
import math

import ml_collections

from configs.common import (classifier_group, eval_group, inpaint_group, optim_group,
                            sampling_group, sde_group, training_group)


def folder_config(*, data_dir: str, image_size: int, center_crop: int = 0,
                  random_flip: bool = True, centered: bool = False, sigma_max: float,
                  n_iters: int, batch_size: int, dropout: float,
                  snapshot_freq_for_preemption: int) -> ml_collections.ConfigDict:
    """The config of a folder data set of square RGB images of ``image_size`` px: the
    folder ``data_dir`` (<data_dir>/train/, <data_dir>/test/), cropped to the centre square of
    ``center_crop`` px first when > 0, then resized (shorter side, bicubic) and centre-cropped;
    the Score SDE run settings shared by its CelebA and LSUN defaults (seed 42, Adam lr 2e-4
    with 5000 warm-up steps, gradient clipping at 1, EMA without warm-up, checkpoints every
    50k steps, log every 50)."""
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.device = "auto"

    config.data = data = ml_collections.ConfigDict()
    data.name = "folder"
    data.data_dir = data_dir
    data.download = False               # never: see README.md for where to get the images
    data.image_size = image_size
    data.num_channels = 3
    data.centered = centered            # False: pixels in [0, 1], networks see 2x - 1
    data.random_flip = random_flip
    data.dequantize = False
    data.center_crop = center_crop      # > 0: cut the centre square first (0: none)
    data.max_in_memory_gb = 4.0         # larger decoded folders are read per batch from disk

    config.sde = sde_group(sigma_max=sigma_max)
    config.model = model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.num_classes = 0
    model.learn_sigma = False       # Improved DDPM's variance head [eps, v] (mlp, ddpm, ncsnpp)
    model.checkpointing = False     # activation checkpointing of the blocks (ddpm, ncsnpp, ncsn*)
    model.ema_rate = 0.999
    model.ema_warmup = False            # the papers' plain EMA
    model.dropout = dropout

    per_call = max(1, 512 * 32 * 32 // image_size ** 2)
    config.training = training = training_group(n_iters=n_iters, batch_size=batch_size,
                                                log_freq=50)
    training.snapshot_freq = 50_000
    training.snapshot_freq_for_preemption = snapshot_freq_for_preemption
    training.num_grid_samples = min(64, max(4, 2 * per_call))
    config.optim = optim = optim_group(warmup=5000)
    optim.lr = 2e-4

    config.sampling = sampling = sampling_group(num_samples=64)
    sampling.batch_size = per_call
    # likelihood of the first 1000 test images (0: all); FID etc. over 50k samples
    config.eval = eval_group(likelihood_samples=1000, batch_size=per_call, trace="hutchinson",
                             num_samples=50_000, sample_batch=per_call)
    # a noise-conditional classifier for guidance (--mode train_classifier; the papers train
    # none on these data): the classes are the class subfolders of the folder, so set
    # num_classes to their count; conv blocks halve the image down to 8 px
    levels = max(1, int(math.log2(image_size / 8)) + 1)
    config.classifier = classifier_group(
        name="conv", num_classes=2, nf=64, ch_mult=tuple(min(2 ** i, 4) for i in range(levels)),
        embedding_dim=128, fourier_scale=16.0, n_iters=100_000, batch_size=batch_size, lr=2e-4,
        eval_sigmas=(0.05, 0.1, 0.25, 0.5))
    config.inpaint = inpaint_group(num_images=16)
    config.inpaint.batch_size = per_call
    return config
