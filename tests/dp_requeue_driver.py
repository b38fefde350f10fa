"""Test helper (tests/test_distributed.py): one rank of `python -m xray.train`, with a
submitit-like SIGUSR2 handler (rank 0 requeues: exit code 3; the other ranks' handler does
nothing, as submitit's does), and the time-limit signal sent to rank XRAY_TEST_SIGNAL_RANK only,
while step XRAY_TEST_STOP_STEP runs."""
import os
import signal
import sys

import xray.step
import xray.train
from xray.distributed import launched_rank

REQUEUED = 3


def submitit_like(signum, frame):
    if launched_rank() == 0:
        print("requeued", flush=True)
        sys.exit(REQUEUED)


signal.signal(signal.SIGUSR2, submitit_like)
stop, who = int(os.environ["XRAY_TEST_STOP_STEP"]), int(os.environ["XRAY_TEST_SIGNAL_RANK"])
real_masks = xray.step.dropout_masks


def masks_then_signal(p, batch, seed, step):
    if step == stop and launched_rank() == who:
        os.kill(os.getpid(), signal.SIGUSR2)
    return real_masks(p, batch, seed, step)


xray.step.dropout_masks = masks_then_signal
xray.train.main()
