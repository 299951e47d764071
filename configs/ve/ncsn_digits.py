"""NCSN (10 noise levels, annealed Langevin dynamics) on the 8x8 digits: the family of
configs/ve/ncsn_cifar.py at a size that trains on a CPU. sigma_1 = 10 is the largest distance
between two training digits in [-1, 1] (9.6; NCSNv2 technique 1) rather than CIFAR-10's 1;
sigma_10 = 0.01; step size eps = 2e-5 as in NCSN's Alg. 1, 100 steps per level."""
from configs.default_digits import get_default_configs
from configs.ve.ncsn_cifar import ncsn_model


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.sde.num_scales = 10
    config.training.continuous = False
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = 100
    config.sampling.ald.step_lr = 2e-5
    ncsn_model(config.model, name="ncsn", scale_by_sigma=False, ema_rate=0.999)
    config.model.nf = 16
    return config
