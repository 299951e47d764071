"""Class-conditional VP SDE on the 2-D eight-mode mixture: the label of a point is the
mixture component it was drawn from (run_lib.datasets.MixtureDataset), so the conditional
data of class k is the Gaussian k and its exact score is known. Classifier-free guidance
training (Ho & Salimans 2022): training.p_uncond = 0.1 replaces a label by the null label 8
(the MLP gets 9 embedding rows)."""
from configs.default_toy import get_default_configs


def get_config():
    config = get_default_configs()
    config.model.num_classes = 8
    config.training.p_uncond = 0.1
    return config
