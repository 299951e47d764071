"""run_lib: what main.py runs: training loops, evaluation and checkpoint files."""
from .toy import relative_score_error, train_toy
from .utils import pick_device, save_atomic, write_config

__all__ = ["train_toy", "relative_score_error", "pick_device", "save_atomic", "write_config"]
