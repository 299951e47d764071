"""NCSN++ (continuous VE SDE) on the 8x8 digits: the architecture of configs/ve/ncsnpp_cifar.py
(FIR resampling, BigGAN blocks with skip rescaling, residual progressive input, Fourier
features of log sigma, output divided by sigma) at CPU size: 32 channels, two resolutions
(8, 4), one block each, attention at 4x4; sigma 0.01 -> 10."""
from configs.default_cifar10 import ncsnpp_model
from configs.default_digits import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    ncsnpp_model(config.model, num_res_blocks=1, fir=True, progressive_input="residual",
                 embedding_type="fourier", scale_by_sigma=True, ema_rate=0.999)
    small(config.model)
    return config


def small(model) -> None:
    """The CPU-size NCSN++ / DDPM++ of the digits configs."""
    model.nf = 32
    model.ch_mult = (1, 2)
    model.attn_resolutions = (4,)
    model.dropout = 0.1
