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
from configs.ve.ncsn_cifar import ncsn_model


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 90.0
    config.sde.num_scales = 500
    config.training.continuous = False
    config.training.n_iters = 210_001
    config.training.batch_size = 128
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = 5
    config.sampling.ald.step_lr = 3.3e-6
    config.sampling.ald.denoise = True
    ncsn_model(config.model, name="ncsnv2_64", scale_by_sigma=True, ema_rate=0.999)
    config.model.dropout = 0.0
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = float("inf")   # no clipping (the official -1)
    return config
