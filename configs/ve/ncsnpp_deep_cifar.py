"""NCSN++ deep (continuous VE SDE) on CIFAR-10: 8 residual blocks per resolution
(Score SDE configs/ve/cifar10_ncsnpp_deep_continuous.py; 107,587,075 parameters)."""
from configs.ve import ncsnpp_cifar


def get_config():
    return ncsnpp_cifar.get_config(deep=True)
