"""NCSN++ (continuous VE SDE, sigma 0.01 -> 50) on CIFAR-10: the Score SDE config
configs/ve/cifar10_ncsnpp_continuous.py (61.8M-62.8M parameters; FID 2.45 in the paper with
PC sampling: reverse diffusion + Langevin, snr 0.16)."""
from configs.default_cifar10 import get_default_configs, ncsnpp_model


def get_config(deep: bool = False):
    config = get_default_configs()
    config.sde.name = "vesde"
    config.training.continuous = True
    config.sampling.method = "pc"
    config.sampling.pc.predictor = "reverse_diffusion"
    config.sampling.pc.corrector = "langevin"
    ncsnpp_model(config.model, num_res_blocks=8 if deep else 4, fir=True,
                 progressive_input="residual", embedding_type="fourier", scale_by_sigma=True,
                 ema_rate=0.999)
    if deep:
        config.training.n_iters = 950_001
    return config
