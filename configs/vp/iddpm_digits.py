"""Improved DDPM on the 8x8 digits: the digits' tiny DDPM U-Net with a variance head, the
cosine schedule over N = 1000 discrete levels and the hybrid loss (lambda = 0.001), sampled
with 50 respaced steps and the learned variance (configs/vp/iddpm_cifar.py has the paper's
CIFAR-10 setting).

    get_config()                                # cosine, learned variances (the iDDPM recipe)
    get_config(schedule="linear", learn_sigma=False)  # DDPM's linear betas, fixed variances

bench/iddpm_digits.py trains the four combinations and writes the README's table.
"""
from configs.default_digits import get_default_configs

#: schedule -> config.sde.name
SCHEDULES = {"cosine": "cosine_vpsde", "linear": "vpsde"}


def get_config(schedule: str = "cosine", learn_sigma: bool = True):
    config = get_default_configs()
    config.sde.name = SCHEDULES[schedule]
    config.sde.num_scales = 1000
    config.training.continuous = False
    config.training.reduce_mean = True
    config.training.loss = "hybrid" if learn_sigma else "simple"
    config.training.vlb_weight = 0.001
    config.training.level_importance = False
    config.model.learn_sigma = learn_sigma
    config.sampling.method = "respaced"
    config.sampling.respaced.update(num_steps=50, variance="learned" if learn_sigma else "small",
                                    spacing="uniform")
    return config
