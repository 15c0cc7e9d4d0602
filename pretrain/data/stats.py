"""Bad-sample accounting: skipped samples are counted per reason, handed on with each batch, and logged at a bounded
rate so a shard full of broken images cannot flood the log."""
import collections
import logging
import time

log = logging.getLogger(__name__)

# Reasons a sample (or a whole shard) is skipped.
UNREADABLE_SHARD = "unreadable_shard"  # cannot be opened, is not a tar, or is cut short
BAD_IMAGE = "bad_image"  # truncated, not an image, or a decompression bomb
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"  # no KEY.txt, or an empty or non-UTF-8 one
BAD_LABEL = "bad_label"  # no KEY.cls, or not an integer


class SkipCounter:
    """Counts skips since the last `drain()`; one per pipeline (so per DataLoader worker)."""

    def __init__(self, log_interval_s: float = 60.0):
        self.log_interval_s = log_interval_s
        self.pending = collections.Counter()
        self.totals = collections.Counter()
        self.last_log = -float("inf")

    def skip(self, reason: str, where: str, error: BaseException | None = None) -> None:
        self.pending[reason] += 1
        self.totals[reason] += 1
        now = time.monotonic()
        if now - self.last_log >= self.log_interval_s:
            self.last_log = now
            log.warning("skipped %s (%s: %r); skipped so far by this worker: %s", where, reason, error,
                        dict(self.totals))

    def handler(self, reason: str):
        """A webdataset exception handler that counts the error and carries on."""

        def count_and_continue(error: BaseException) -> bool:
            self.skip(reason, "shard", error)
            return True

        return count_and_continue

    def drain(self) -> dict[str, int]:
        """Counts since the previous drain, as a plain dict (it travels inside a batch from a worker process)."""
        counts, self.pending = dict(self.pending), collections.Counter()
        return counts

    def discard(self) -> None:
        """Forget pending counts: used when fast-forwarding over samples whose skips were reported before a resume."""
        self.pending.clear()
