"""Progress of a long loop as log lines (xray.convert's images, xray.bench's timed batches)."""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Progress:
    """Logs 'what: done/total (pct), rate, eta' at most every `every_s` seconds, and when done.

    A plain log line per update rather than tqdm: tqdm redraws its bar with carriage returns,
    which a Slurm log file (or Hydra's job log) keeps as one garbled line."""

    def __init__(self, what: str, total: int, every_s: float = 5.0, per_item: int = 1,
                 unit: str = "items") -> None:
        # per_item: units per counted item, e.g. images per batch, so the rate reads in img/s
        self.what, self.total, self.every_s = what, total, every_s
        self.per_item, self.unit = per_item, unit
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        per_s = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / per_s if per_s > 0 else float("inf")
        log.info("%s: %d/%d (%.0f%%), %.1f %s/s, eta %.0f s", self.what, done, self.total,
                 100.0 * done / max(self.total, 1), per_s * self.per_item, self.unit, eta)
