"""Test helper (tests/test_distributed.py): one rank of `python -m xray.train` whose rank 0
spends XRAY_TEST_END_DELAY seconds more on its final evaluation than the other ranks (as a
large test split does), longer than MindSpore's default 30 s wait of a CPU collective."""
import os
import time

import xray.train
from xray.distributed import launched_rank

real_evaluate_splits = xray.train.evaluate_splits


def slow_on_rank0(*args, **kwargs):
    if launched_rank() == 0:
        time.sleep(float(os.environ["XRAY_TEST_END_DELAY"]))
    return real_evaluate_splits(*args, **kwargs)


xray.train.evaluate_splits = slow_on_rank0
xray.train.main()
