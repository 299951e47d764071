"""NCSN (Song & Ermon 2019) on CIFAR-10: the discrete VE SDE with 10 noise levels, geometric
from sigma_1 = 1 to sigma_10 = 0.01, the RefineNet with conditional instance norm++
(nf 128, ELU), Adam lr 1e-3 without warm-up, clipping or EMA, batch 128, 200k steps;
sampled with annealed Langevin dynamics (Alg. 1: T = 100 steps per level, step size
eps = 2e-5, i.e. alpha_i = eps sigma_i^2 / sigma_L^2). Inception score 8.87 in the paper.
Score SDE: configs/ve/ncsn/cifar10.py."""
from configs.default_cifar10 import get_default_configs


def ncsn_model(model, *, name: str, scale_by_sigma: bool, ema_rate: float) -> None:
    """The RefineNet of NCSN / NCSNv2 with the Score SDE key names."""
    model.name = name
    model.scale_by_sigma = scale_by_sigma
    model.ema_rate = ema_rate
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128
    model.interpolation = "bilinear"


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 1.0
    config.sde.num_scales = 10
    config.training.continuous = False
    config.training.n_iters = 200_001
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = 100
    config.sampling.ald.step_lr = 2e-5
    ncsn_model(config.model, name="ncsn", scale_by_sigma=False, ema_rate=0.0)
    config.optim.lr = 1e-3
    config.optim.warmup = 0
    config.optim.grad_clip = float("inf")   # no clipping (the official -1)
    return config
