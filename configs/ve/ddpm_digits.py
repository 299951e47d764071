"""VE SDE (continuous SMLD) on the 8x8 digits with a tiny DDPM U-Net.

With a continuous VE SDE, models.get_score_fn conditions the network on sigma itself (not on
999 t) and, with scale_by_sigma=True, returns network(x, sigma) / sigma. The DDPM net so
learns sigma * score = -noise: the same noise-like output, up to sign, as in the VP runs,
with no 1/sigma range to cover. The sinusoidal embedding of sigma in [0.01, 10] resolves
the smallest sigmas poorly (NCSN++ uses Fourier features of log sigma instead); fine for
this small baseline.
"""
from configs.default_digits import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.model.scale_by_sigma = True
    return config
