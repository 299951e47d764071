"""DDPM++ deep (continuous VP SDE) on CIFAR-10 (Score SDE
configs/vp/cifar10_ddpmpp_deep_continuous.py; 106,632,579 parameters)."""
from configs.vp import ddpmpp_cifar


def get_config():
    return ddpmpp_cifar.get_config(deep=True)
