"""DDPM++ (continuous sub-VP SDE) on CIFAR-10 (Score SDE
configs/subvp/cifar10_ddpmpp_continuous.py: the VP architecture and training, sub-VP SDE;
the paper's best likelihoods, 2.99 bits/dim for the deep model with likelihood weighting)."""
from configs.vp import ddpmpp_cifar


def get_config():
    return ddpmpp_cifar.get_config(sde="subvpsde")
