"""The tqdm bar is drawn on a terminal only: redrawn into a SLURM log file it floods it."""
import io
import sys

import pytest

from pretrain.engine.metrics import MetricsLogger


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stderr, has_bar", [(io.StringIO(), False), (Terminal(), True)])
def test_bar_only_when_stderr_is_a_terminal(tmp_path, monkeypatch, stderr, has_bar):
    monkeypatch.setattr(sys, "stderr", stderr)
    metrics = MetricsLogger(tmp_path, True, 4, 0, tensorboard=False, progress_bar=True)
    assert (metrics.bar is not None) == has_bar
    if has_bar:
        metrics.bar.close()
