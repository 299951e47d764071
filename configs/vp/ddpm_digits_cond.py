"""Class-conditional VP SDE (continuous DDPM) on the 8x8 digits, trained for classifier-free
guidance (Ho & Salimans 2022): the tiny DDPM U-Net gets a learned class embedding
(model.num_classes = 10) and, with probability training.p_uncond = 0.1, a training label is
replaced by the null label 10, so the network has 11 embedding rows and gives both the
conditional score (labels 0..9) and the unconditional one (label 10) that guidance mixes.
Sample mode and the training grid draw the classes 0..9 in turn."""
from configs.default_digits import get_default_configs


def get_config():
    config = get_default_configs()
    config.model.num_classes = 10
    config.training.p_uncond = 0.1
    return config
