"""NCSN (10 noise levels, annealed Langevin dynamics) on the 8x8 digits: the family of
configs/ve/ncsn_cifar.py at a size that trains on a CPU. sigma_1 = 10 is the largest distance
between two training digits in [-1, 1] (9.6; NCSNv2 technique 1) rather than CIFAR-10's 1;
sigma_10 = 0.01; step size eps = 2e-5 as in NCSN's Alg. 1, 100 steps per level.

1000 training steps (about 3.5 min on one CPU thread), not the digits default of 300: this
RefineNet outputs the score itself (no division by sigma), which must reach 1 / sigma = 100
at the smallest level, and it learns that slower than the U-Nets. Measured with
bench/digits_configs.py (100 ALD samples vs the 297 test digits; pixel FD floor of 100
training digits 0.66): 300 steps give speckled noise (pixel FD 2.26, the classifier's
feature FD 243), 500 steps blurred strokes (1.45 / 179), 750 steps 0.96 / 142, 1000 steps
digits (0.79 / 145).
A larger or smaller ALD step size does not rescue the 300-step model (2.3-11 for
eps = 5e-6 ... 2e-4)."""
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
    config.training.n_iters = 1000
    config.training.snapshot_freq = 500
    config.training.sample_freq = 1000
    return config
