"""NCSNv2 (Song & Ermon 2020) on CelebA at 64 x 64: the official configs/celeba.yml of
ermongroup/ncsnv2 (its NCSNv2: our ncsnv2_64 variant), on configs/default_celeba.py.

SDE: discrete VE, 500 noise levels geometric from sigma_1 = 90 to 0.01; network: the
unconditional RefineNet with InstanceNorm++, ELU, nf 128, output divided by sigma; EMA
0.999; batch 128, 210,000 steps, Adam lr 1e-4 (eps 1e-8), no warm-up, no clipping, no weight
decay; data in [0, 1], random flips; annealed Langevin dynamics with 5 steps per level, step
size 3.3e-6 and the final denoising step. 29,694,083 parameters (the official model's
count).

Data: centre crop 140, then 64 px (configs/default_celeba.py). Score SDE's
configs/ve/ncsnv2/celeba.py has the same SDE, network and optimizer, but trains 1.3M steps
and samples with its ALD corrector at snr 0.128.
"""
from configs.default_celeba import get_default_configs
from configs.highres import ncsnv2


def get_config():
    return ncsnv2(get_default_configs(), name="ncsnv2_64", sigma_max=90.0, num_scales=500,
                  n_iters=210_001, batch_size=128, n_steps_each=5, step_lr=3.3e-6)
