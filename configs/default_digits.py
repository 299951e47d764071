"""Shared default for the 8x8 scikit-learn digits (1 channel, 1797 images, 1500 for
training): a tiny DDPM U-Net that trains in a few minutes on a CPU."""
import ml_collections

from configs.common import (classifier_group, eval_group, inpaint_group, optim_group,
                            sampling_group, sde_group, training_group)


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
    # None: the data set's default (never for digits); a placeholder so the CLI can set it
    data.random_flip = ml_collections.config_dict.placeholder(bool)
    data.dequantize = False

    # sigma_max: the largest distance between two training images is 9.6
    config.sde = sde_group(sigma_max=10.0)

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
    model.learn_sigma = False       # Improved DDPM's variance head [eps, v] (mlp, ddpm, ncsnpp)
    model.checkpointing = False     # activation checkpointing of the blocks (ddpm, ncsnpp, ncsn*)
    model.ema_rate = 0.99            # short runs: 0.999 leaves the EMA near the initial weights for ~1000 steps
    model.ema_warmup = True          # decay min(ema_rate, (1 + n) / (10 + n)): after n steps the
                                     # EMA spans ~n / 9 steps, so 0.999 configs suit 300 steps too

    config.training = training = training_group(n_iters=300, batch_size=64, log_freq=25)
    training.snapshot_freq = 100                # checkpoints/checkpoint_<step>.pt
    training.snapshot_freq_for_preemption = 50  # checkpoints/latest.pt (resume point)
    training.sample_freq = 300                  # sample grid (EMA weights) in TensorBoard + samples/
    training.eval_freq = 100                    # EMA test loss on eval_batches test batches
    training.eval_batches = 4                   # 4 x 64 of the 297 test digits
    config.optim = optim_group(warmup=50)
    config.sampling = sampling_group(num_samples=100)
    config.sampling.batch_size = 0      # images per sampler call (0: all at once)
    # likelihood_samples 0: all 297 test digits; trace "exact" is affordable at D = 64
    config.eval = eval_group(likelihood_samples=0, batch_size=0, trace="hutchinson",
                             num_samples=2000, sample_batch=500)     # --mode eval: 2000 samples
    config.eval.vlb_levels = 100    # the VLB's KL terms: an unbiased subset of 100 of the 999
    # noise-conditional classifier for guidance (--mode train_classifier): a small conv net
    config.classifier = classifier_group(
        name="conv", num_classes=10, nf=32, ch_mult=(1, 2, 2), embedding_dim=64,
        fourier_scale=1.0, n_iters=1000, batch_size=128, lr=2e-3,
        eval_sigmas=(0.1, 0.5, 1.0, 2.0))
    # --mode inpaint: fill the bottom half of the first 16 test digits (run_lib.inverse)
    config.inpaint = inpaint_group(num_images=16)
    return config
