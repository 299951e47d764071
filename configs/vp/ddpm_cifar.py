"""DDPM (Ho et al. 2020) on CIFAR-10 as the discrete VP SDE: 1000 steps, beta 1e-4 -> 0.02
(beta 0.1 -> 20 in the SDE's units), the 35.7M-parameter U-Net (35,218,947 in the Score SDE
code), dropout 0.1, EMA 0.9999, noise-prediction loss (reduce_mean), ancestral sampling
(DDPM Alg. 2); Score SDE configs/vp/ddpm/cifar10.py. FID 3.17 in the DDPM paper."""
from configs.default_cifar10 import get_default_configs


def ddpm_model(model, *, ch_mult) -> None:
    """The DDPM U-Net (Ho et al. 2020) with the Score SDE key names: nf 128, ``ch_mult``,
    num_res_blocks 2, attention at 16, convolutional resampling, EMA 0.9999, output not
    divided by sigma."""
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.nf = 128
    model.ch_mult = tuple(ch_mult)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True


def get_config():
    config = get_default_configs()
    config.sde.name = "vpsde"
    config.data.centered = True
    config.training.continuous = False
    config.training.reduce_mean = True
    config.sampling.method = "pc"
    config.sampling.pc.predictor = "ancestral_sampling"
    config.sampling.pc.corrector = "none"
    ddpm_model(config.model, ch_mult=(1, 2, 2, 2))
    return config
