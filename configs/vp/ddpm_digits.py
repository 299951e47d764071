"""VP SDE (continuous DDPM) on the 8x8 digits with a tiny DDPM U-Net (conditioned on 999 t,
output divided by -std: it predicts the noise)."""
from configs.default_digits import get_default_configs


def get_config():
    return get_default_configs()
