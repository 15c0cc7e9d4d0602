"""Bad-sample accounting: skipped samples are counted per reason, handed on with each batch, and logged at a bounded
rate so a shard full of broken images cannot flood the log."""
import collections
import logging
import time

log = logging.getLogger(__name__)

# Reasons a sample (or a whole shard) is skipped.
UNREADABLE_SHARD = "unreadable_shard"  # cannot be opened, is not a tar, is cut short, or has an oversized header
BAD_IMAGE = "bad_image"  # truncated, not an image, or not a JPEG, PNG or WebP
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"  # no KEY.txt, or an empty or non-UTF-8 one
BAD_LABEL = "bad_label"  # no KEY.cls, or not an integer
OVERSIZED_MEMBER = "oversized_member"  # a member over data.limits.member_bytes, left unread
OVERSIZED_IMAGE = "oversized_image"  # over data.limits.image_pixels (or PIL's own bomb limit), left undecoded

# Counted like the skips, but the sample is kept.
TRUNCATED_CAPTION = "truncated_caption"  # cut to data.limits.caption_chars before tokenising
NOT_SKIPS = frozenset({TRUNCATED_CAPTION})


def skipped_total(counts: dict[str, int]) -> int:
    """Samples (and shards) actually dropped, from counts by reason that may also hold NOT_SKIPS."""
    return sum(count for reason, count in counts.items() if reason not in NOT_SKIPS)


class SkipCounter:
    """Counts skips since the last `drain()`; one per pipeline (so per DataLoader worker)."""

    def __init__(self, log_interval_s: float = 60.0):
        self.log_interval_s = log_interval_s
        self.pending = collections.Counter()
        self.totals = collections.Counter()
        self.last_log = -float("inf")

    def skip(self, reason: str, where: str, error: BaseException | None = None) -> None:
        self._count(reason, "skipped", where, error)

    def note(self, reason: str, where: str) -> None:
        """Count a sample that is kept but altered (one of NOT_SKIPS)."""
        self._count(reason, "kept", where, None)

    def _count(self, reason: str, outcome: str, where: str, error: BaseException | None) -> None:
        self.pending[reason] += 1
        self.totals[reason] += 1
        now = time.monotonic()
        if now - self.last_log >= self.log_interval_s:
            self.last_log = now
            log.warning("%s %s (%s: %r); counted so far by this worker: %s", outcome, where, reason, error,
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
