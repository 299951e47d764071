"""Class-conditional VE SDE (continuous SMLD) on the 8x8 digits with the tiny DDPM U-Net
(configs/ve/ddpm_digits.py: conditioned on sigma, scale_by_sigma) and classifier-free
guidance training (Ho & Salimans 2022): model.num_classes = 10, training.p_uncond = 0.1, the
null label is 10 (11 embedding rows)."""
from configs.default_digits import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.model.scale_by_sigma = True
    config.model.num_classes = 10
    config.training.p_uncond = 0.1
    return config
