"""DDPM++ (continuous VP SDE) on the 8x8 digits: the architecture of configs/vp/ddpmpp_cifar.py
(BigGAN blocks with skip rescaling, positional embedding of 999 t, no FIR) at CPU size."""
from configs.default_cifar10 import ncsnpp_model
from configs.default_digits import get_default_configs
from configs.ve.ncsnpp_digits import small


def get_config(sde: str = "vpsde"):
    config = get_default_configs()
    config.sde.name = sde
    ncsnpp_model(config.model, num_res_blocks=1, fir=False, progressive_input="none",
                 embedding_type="positional", scale_by_sigma=False, ema_rate=0.999)
    small(config.model)
    return config
