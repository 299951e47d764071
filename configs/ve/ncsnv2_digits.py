"""NCSNv2 on the 8x8 digits: the family of configs/ve/ncsnv2_cifar.py at CPU size: 100 noise
levels from 10 (largest pairwise distance) to 0.01 (NCSNv2 technique 2 asks for
(sigma_i / sigma_i+1) ~ 1.07 at D = 64: 100 levels give 1.072), output divided by sigma,
EMA 0.999, annealed Langevin dynamics with 5 steps per level and a final denoising step."""
from configs.default_digits import get_default_configs
from configs.ve.ncsn_cifar import ncsn_model


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.sde.num_scales = 100
    config.training.continuous = False
    config.sampling.method = "ald"
    config.sampling.ald.n_steps_each = 5
    config.sampling.ald.step_lr = 6.2e-6
    ncsn_model(config.model, name="ncsnv2", scale_by_sigma=True, ema_rate=0.999)
    config.model.nf = 16
    return config
