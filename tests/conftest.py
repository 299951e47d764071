"""Suite-wide settings.

One intra-op torch thread: the tests run thousands of small tensor ops, for which the
thread pool only adds synchronisation (measured 5-30x slower on a shared 2-core machine).
"""
import torch


def pytest_configure(config):
    torch.set_num_threads(1)
