"""Shared default for the 256 x 256 data sets of the Score SDE paper (LSUN church_outdoor and
bedroom, CelebA-HQ, FFHQ), with the hyperparameters of the official Score SDE code
(configs/default_lsun_configs.py, which its CelebA-HQ and FFHQ 256 configs also build on):
batch 64, 2.4M steps, Adam lr 2e-4 with 5000 warm-up steps, gradient clipping at 1, no
dropout, seed 42, data in [0, 1] with random flips; VE sigma 0.01 -> 378 over 2000 levels
(each data set sets its sigma_max), VP beta 0.1 -> 20; PC sampling with one Langevin step per
level at snr 0.075 and the final denoising step; preemption checkpoints every 5000 steps.

Data (read per batch from disk: see config.data.max_in_memory_gb):

- LSUN (church_outdoor: 126,227 training images; bedroom: 3,033,042), JPEGs of varying size
  with the shorter side 256: the shorter side is resized to the image size and the centre
  square cut (bicubic; the Score SDE code cuts the centre square first and resizes it with
  an antialiased bicubic filter, the NCSNv2 code resizes first as here). Test: the 300
  validation images.
- CelebA-HQ (30,000 images) and FFHQ (70,000), square at 1024 px: resized to the image size
  (the official tfrecords were downsampled by 2 x 2 box filters). No official test split.
"""
from configs.default_folder import folder_config


def get_default_configs(dataset: str, image_size: int = 256):
    """``dataset``: the folder under data/ (church, bedroom, celebahq, ffhq, tower)."""
    config = folder_config(data_dir=f"data/{dataset}", image_size=image_size, random_flip=True,
                           centered=False, sigma_max=378.0, n_iters=2_400_001, batch_size=64,
                           dropout=0.0, snapshot_freq_for_preemption=5000)
    config.sde.num_scales = 2000
    config.sampling.pc.snr = 0.075
    config.sampling.pc.n_steps = 1
    config.sampling.pc.denoise = True
    return config


def ncsnpp_highres_model(model, *, nf: int, ch_mult, num_res_blocks: int, ema_rate: float) -> None:
    """The NCSN++ of the Score SDE high-resolution configs (ve/*_256_ncsnpp_continuous.py,
    church / bedroom / ffhq_ncsnpp_continuous.py): BigGAN residual blocks with skip rescaling,
    FIR resampling (kernel 1 3 3 1), output_skip progressive growing of the output and
    input_skip (sum) of the input, attention at 16 x 16, Gaussian Fourier embedding of
    log sigma (scale 16), output divided by sigma, no dropout."""
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.ema_rate = ema_rate
    model.dropout = 0.0
    model.nf = nf
    model.ch_mult = tuple(ch_mult)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "fourier"
    model.fourier_scale = 16.0
    model.conv_size = 3
