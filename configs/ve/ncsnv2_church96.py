"""NCSNv2 (Song & Ermon 2020) on LSUN church_outdoor at 96 x 96: the official
configs/church.yml of ermongroup/ncsnv2 (its NCSNv2Deeper: our ncsnv2_128 variant), on
configs/default_lsun.py.

SDE: discrete VE, 788 noise levels geometric from sigma_1 = 140 to 0.01; network: the
unconditional RefineNet with InstanceNorm++, ELU, nf 128, output divided by sigma; EMA
0.999; batch 128, 200,000 steps, Adam lr 1e-4 (eps 1e-8), no warm-up, no clipping, no weight
decay; data in [0, 1], random flips; annealed Langevin dynamics with 4 steps per level, step
size 4.9e-6 and the final denoising step. 83,445,379 parameters (the official model's
count).

The NCSNv2 README shows its church_outdoor samples at 96 px, while church.yml says
image_size 64 with these sigmas, which belong to 96 px: sigma_1 = 140 exceeds sqrt(D) = 111,
the largest distance two 64-px images in [0, 1] can have (technique 1 sets sigma_1 to the
largest distance), and L = 788 is 1.06 x technique 2's count for D = 96 x 96 x 3 (744), the
factor of every other NCSNv2 config (CelebA: 500 = 1.06 x 472); at 64 px it would be 1.06 x
495 = 524.
"""
from configs.default_lsun import get_default_configs
from configs.highres import ncsnv2


def get_config():
    return ncsnv2(get_default_configs("church", image_size=96), name="ncsnv2_128",
                  sigma_max=140.0, num_scales=788, n_iters=200_001, batch_size=128,
                  n_steps_each=4, step_lr=4.9e-6)
