"""DDPM++ (continuous VP SDE, beta 0.1 -> 20) on CIFAR-10: the Score SDE config
configs/vp/cifar10_ddpmpp_continuous.py (61,804,419 parameters; reduce_mean loss,
Euler-Maruyama sampling; data centred to [-1, 1])."""
from configs.default_cifar10 import get_default_configs, ncsnpp_model


def get_config(deep: bool = False, sde: str = "vpsde"):
    config = get_default_configs()
    config.sde.name = sde
    config.data.centered = True
    config.training.continuous = True
    config.training.reduce_mean = True
    config.sampling.method = "pc"
    config.sampling.pc.predictor = "euler_maruyama"
    config.sampling.pc.corrector = "none"
    ncsnpp_model(config.model, num_res_blocks=8 if deep else 4, fir=False,
                 progressive_input="none", embedding_type="positional", scale_by_sigma=False,
                 ema_rate=0.9999)
    if deep:
        config.training.n_iters = 950_001
    return config
