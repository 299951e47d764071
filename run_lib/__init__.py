"""run_lib: what main.py runs: training loops, evaluation and checkpoint files."""
from .toy import likelihood_toy, relative_score_error, sample_toy, train_toy
from .utils import pick_device, save_atomic, write_config

__all__ = ["train_toy", "sample_toy", "likelihood_toy", "relative_score_error", "pick_device", "save_atomic", "write_config"]
