"""NCSNv2 (Song & Ermon 2020) on CIFAR-10: the discrete VE SDE with 232 noise levels,
geometric from sigma_1 = 50 (technique 1: the largest pairwise distance of the data) to
0.01 (technique 2), the unconditional RefineNet with InstanceNorm++ whose output is divided
by sigma (technique 3: scale_by_sigma), EMA 0.999 (technique 5), Adam lr 1e-4, batch 128,
300k steps; sampled with annealed Langevin dynamics, 5 steps per level, step size
eps = 6.2e-6 (technique 4) and a final denoising step. FID 10.87 in the paper.
Score SDE: configs/ve/ncsnv2/cifar10.py."""
from configs.default_cifar10 import get_default_configs
from configs.ve.ncsn_cifar import ncsn_model


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.sde.num_scales = 232
    config.training.continuous = False
    config.training.n_iters = 300_001
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = 5
    config.sampling.ald.step_lr = 6.2e-6
    config.sampling.ald.denoise = True
    ncsn_model(config.model, name="ncsnv2", scale_by_sigma=True, ema_rate=0.999)
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = float("inf")   # no clipping (the official -1)
    return config
