"""sub-VP SDE (continuous) on the 8x8 digits with a tiny DDPM U-Net (conditioned on 999 t,
output divided by -std)."""
from configs.default_digits import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "subvpsde"
    return config
