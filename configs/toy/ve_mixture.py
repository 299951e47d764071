"""VE SDE (continuous NCSN) on the 2-D eight-mode mixture: sigma-conditioned network with
Fourier features of log sigma, output divided by sigma."""
from configs.default_toy import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.model.embedding_type = "fourier"
    config.model.scale_by_sigma = True
    return config
