"""Builders of the high-resolution configs (configs/ve/ncsnpp_*, ncsnv2_* and vp/ddpm_* on the
image folders; README "High-resolution configs"): each family's settings once, the data set
and the values that differ between its members as arguments. Every config file keeps the
docstring that cites the official config it reproduces and calls one of these in get_config().
"""
import ml_collections

from configs.default_lsun import get_default_configs, ncsnpp_highres_model
from configs.ve.ncsn_cifar import ncsn_model
from configs.vp.ddpm_cifar import ddpm_model


def ddpm_256(dataset: str) -> ml_collections.ConfigDict:
    """DDPM (Ho et al. 2020) at 256 x 256 on data/<dataset> as the discrete VP SDE, as the
    Score SDE configs/vp/ddpm/{church,bedroom,celebahq}.py: 1000 steps, beta 0.1 -> 20,
    discrete training with the noise-prediction loss (reduce_mean), data in [-1, 1], Adam lr
    2e-5, ancestral sampling without corrector; the DDPM U-Net of
    configs.vp.ddpm_cifar.ddpm_model with ch_mult (1, 1, 2, 2, 4, 4) (256 -> 8 px), no
    dropout."""
    config = get_default_configs(dataset)
    config.sde.name = "vpsde"
    config.sde.num_scales = 1000
    config.data.centered = True
    config.training.continuous = False
    config.training.reduce_mean = True
    config.optim.lr = 2e-5
    config.sampling.method = "pc"
    config.sampling.pc.predictor = "ancestral_sampling"
    config.sampling.pc.corrector = "none"
    ddpm_model(config.model, ch_mult=(1, 1, 2, 2, 4, 4))
    config.model.dropout = 0.0
    return config


def ncsnpp_continuous(dataset: str, *, image_size: int, sigma_max: float, nf: int, ch_mult,
                      num_res_blocks: int, ema_rate: float) -> ml_collections.ConfigDict:
    """NCSN++ on the continuous VE SDE (sigma 0.01 -> ``sigma_max``, 2000 levels) on
    data/<dataset> at ``image_size`` px, as the Score SDE ve/*_ncsnpp_continuous.py: PC
    sampling with reverse diffusion + Langevin; the network of
    configs.default_lsun.ncsnpp_highres_model with ``nf``, ``ch_mult``, ``num_res_blocks`` and
    ``ema_rate``."""
    config = get_default_configs(dataset, image_size=image_size)
    config.sde.name = "vesde"
    config.sde.sigma_max = sigma_max
    config.training.continuous = True
    config.sampling.method = "pc"
    config.sampling.pc.predictor = "reverse_diffusion"
    config.sampling.pc.corrector = "langevin"
    ncsnpp_highres_model(config.model, nf=nf, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         ema_rate=ema_rate)
    return config


def ncsnpp_256(dataset: str, *, sigma_max: float) -> ml_collections.ConfigDict:
    """NCSN++ (continuous VE SDE) at 256 x 256 on data/<dataset>, as the Score SDE
    {church,bedroom}_ncsnpp_continuous.py and {celebahq,ffhq}_256_ncsnpp_continuous.py, which
    differ only in ``sigma_max``: nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2) (256 -> 4 px),
    num_res_blocks 2, EMA 0.999."""
    return ncsnpp_continuous(dataset, image_size=256, sigma_max=sigma_max, nf=128,
                             ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, ema_rate=0.999)


def ncsnv2(config: ml_collections.ConfigDict, *, name: str, sigma_max: float, num_scales: int,
           n_iters: int, batch_size: int, n_steps_each: int,
           step_lr: float) -> ml_collections.ConfigDict:
    """NCSNv2 (Song & Ermon 2020) as ermongroup/ncsnv2's configs/*.yml, on a folder default
    ``config`` (configs/default_celeba.py or default_lsun.py), changed in place and returned:
    the discrete VE SDE with ``num_scales`` levels geometric from ``sigma_max`` to 0.01; the
    unconditional RefineNet ``name`` (ncsnv2_64 / ncsnv2_128 / ncsnv2_256) with
    InstanceNorm++, ELU, nf 128, output divided by sigma, no dropout, EMA 0.999; ``n_iters``
    steps of ``batch_size``, Adam lr 1e-4 without warm-up or clipping; annealed Langevin
    dynamics with ``n_steps_each`` steps per level of size ``step_lr`` and the final
    denoising step."""
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = sigma_max
    config.sde.num_scales = num_scales
    config.training.continuous = False
    config.training.n_iters = n_iters
    config.training.batch_size = batch_size
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = n_steps_each
    config.sampling.ald.step_lr = step_lr
    config.sampling.ald.denoise = True
    ncsn_model(config.model, name=name, scale_by_sigma=True, ema_rate=0.999)
    config.model.dropout = 0.0
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = float("inf")   # no clipping (the official -1)
    return config
