"""VP SDE (continuous DDPM) on the 2-D eight-mode mixture."""
from configs.default_toy import get_default_configs


def get_config():
    return get_default_configs()
