"""DDPM++ (continuous sub-VP SDE) on the 8x8 digits (configs/subvp/ddpmpp_cifar.py's family)."""
from configs.vp import ddpmpp_digits


def get_config():
    return ddpmpp_digits.get_config(sde="subvpsde")
