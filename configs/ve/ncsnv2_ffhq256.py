"""NCSNv2 (Song & Ermon 2020) on FFHQ at 256 x 256: the official configs/ffhq.yml of
ermongroup/ncsnv2 (its NCSNv2Deepest: our ncsnv2_256 variant), on configs/default_lsun.py.

SDE: discrete VE, 2311 noise levels geometric from sigma_1 = 348 to 0.01; network: the
unconditional RefineNet with InstanceNorm++, ELU, nf 128, output divided by sigma; EMA
0.999; batch 32, 80,000 steps, Adam lr 1e-4 (eps 1e-3), no warm-up, no clipping, no weight
decay; data in [0, 1], random flips; annealed Langevin dynamics with 3 steps per level, step
size 9e-7 and the final denoising step. 94,132,611 parameters (the official model's count).

Adam's eps is 1e-3 (not 1e-8) as in ffhq.yml.
"""
from configs.default_lsun import get_default_configs
from configs.ve.ncsn_cifar import ncsn_model


def get_config():
    config = get_default_configs("ffhq", image_size=256)
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 348.0
    config.sde.num_scales = 2311
    config.training.continuous = False
    config.training.n_iters = 80_001
    config.training.batch_size = 32
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = 3
    config.sampling.ald.step_lr = 9e-7
    config.sampling.ald.denoise = True
    ncsn_model(config.model, name="ncsnv2_256", scale_by_sigma=True, ema_rate=0.999)
    config.model.dropout = 0.0
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = float("inf")   # no clipping (the official -1)
    config.optim.eps = 1e-3
    return config
