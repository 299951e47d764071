"""NCSNv2 (Song & Ermon 2020) on LSUN tower at 128 x 128: the official configs/tower.yml of
ermongroup/ncsnv2 (its NCSNv2Deeper: our ncsnv2_128 variant), on configs/default_lsun.py.

SDE: discrete VE, 1086 noise levels geometric from sigma_1 = 190 to 0.01; network: the
unconditional RefineNet with InstanceNorm++, ELU, nf 128, output divided by sigma; EMA
0.999; batch 128, 150,000 steps, Adam lr 1e-4 (eps 1e-8), no warm-up, no clipping, no weight
decay; data in [0, 1], random flips; annealed Langevin dynamics with 3 steps per level, step
size 1.8e-6 and the final denoising step. 83,445,379 parameters (the official model's
count).
"""
from configs.default_lsun import get_default_configs
from configs.highres import ncsnv2


def get_config():
    return ncsnv2(get_default_configs("tower", image_size=128), name="ncsnv2_128",
                  sigma_max=190.0, num_scales=1086, n_iters=150_001, batch_size=128,
                  n_steps_each=3, step_lr=1.8e-6)
