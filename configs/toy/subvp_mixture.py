"""Sub-VP SDE on the 2-D eight-mode mixture."""
from configs.default_toy import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "subvpsde"
    return config
