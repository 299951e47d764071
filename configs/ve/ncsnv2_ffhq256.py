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
from configs.highres import ncsnv2


def get_config():
    config = ncsnv2(get_default_configs("ffhq", image_size=256), name="ncsnv2_256",
                    sigma_max=348.0, num_scales=2311, n_iters=80_001, batch_size=32,
                    n_steps_each=3, step_lr=9e-7)
    config.optim.eps = 1e-3     # ffhq.yml
    return config
