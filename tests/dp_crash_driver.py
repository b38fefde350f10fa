"""Test helper (tests/test_distributed.py): one rank of `python -m xray.train` under a
submitit-like SIGTERM handler (submitit's only logs the signal); rank XRAY_TEST_CRASH_RANK dies
at once (os._exit, as after a segfault or the OOM killer) while step XRAY_TEST_CRASH_STEP runs,
leaving the other ranks in that step's AllReduce."""
import os
import signal

import xray.step
import xray.train
from xray.distributed import launched_rank

crash, who = int(os.environ["XRAY_TEST_CRASH_STEP"]), int(os.environ["XRAY_TEST_CRASH_RANK"])
real_masks = xray.step.dropout_masks


def masks_then_crash(p, batch, seed, step):
    if step == crash and launched_rank() == who:
        print(f"rank {who} dies at step {step}", flush=True)
        os._exit(9)
    return real_masks(p, batch, seed, step)


def submitit_like_bypass(signum, frame):
    print("bypassing SIGTERM", flush=True)


signal.signal(signal.SIGTERM, submitit_like_bypass)
xray.step.dropout_masks = masks_then_crash
xray.train.main()
