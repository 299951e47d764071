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
from configs.ve.ncsn_cifar import ncsn_model


def get_config():
    config = get_default_configs("tower", image_size=128)
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 190.0
    config.sde.num_scales = 1086
    config.training.continuous = False
    config.training.n_iters = 150_001
    config.training.batch_size = 128
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = 3
    config.sampling.ald.step_lr = 1.8e-6
    config.sampling.ald.denoise = True
    ncsn_model(config.model, name="ncsnv2_128", scale_by_sigma=True, ema_rate=0.999)
    config.model.dropout = 0.0
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = float("inf")   # no clipping (the official -1)
    return config
