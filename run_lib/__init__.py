"""run_lib: the run pipeline that main.py drives, for every data set alike.

    compose      builds the SDE, network, score function, loss and sampler call from a config
    datasets     image data sets and the 2-D toy mixtures (train / test splits, batches)
    state        the train state (model, EMA, optimizer, RNGs, step)
    train        the training loop: train_step and its scheduled actions
    checkpoints  reading checkpoint files, with the fallback from a corrupt latest.pt
    evaluate     sample and likelihood modes, the comparison table
    exact        evaluations of data with a closed-form density (score error, true NLL, modes)
    demo         the main job on the built-in digits
"""
from .utils import pick_device, save_atomic, write_config

__all__ = ["pick_device", "save_atomic", "write_config"]
