"""Training progress on stdout: a bar with ETA on a terminal, plain log lines otherwise.

``Progress.update(record)`` is called with each ``metrics.jsonl`` record (once per log
interval, so it adds no host sync). On an interactive stream (``stream.isatty()``) one line is
rewritten in place with ``\\r``::

  step 40/200 [####----------------] 20%  loss 2.3456  12,345 tokens/s  ETA 0:01:05

Otherwise (a pipe, a log file) each record is one line::

  step     40  loss 2.3456  lr 1.00e-03  grad_norm 0.123  12,345 tokens/s

The ETA is the remaining steps at the step rate since the first record; at the first record,
which includes compilation, it is the rate since the ``Progress`` was made.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Callable, Mapping, TextIO

__all__ = ["Progress"]


class Progress:
  """Reports records of a run of steps ``start + 1 .. total`` on ``stream`` (default stdout).

  Args:
    total: the last step of the run.
    start: the step the run starts after (a resumed run's checkpoint step).
    stream: where to write; a bar if ``stream.isatty()``, plain lines otherwise.
    clock: seconds, for the ETA (``time.perf_counter``).
    width: characters of the bar.
  """

  def __init__(self, total: int, start: int = 0, stream: TextIO | None = None,
               clock: Callable[[], float] = time.perf_counter, width: int = 20):
    self.total, self.width, self._clock = total, width, clock
    self._stream = sys.stdout if stream is None else stream
    self.bar = self._stream.isatty()
    self._first = (start, clock())  # (step, time) the rate is measured from
    self._started = False
    self._shown = 0  # characters of the bar line on screen

  def _eta(self, step: int) -> str:
    """``H:MM:SS`` left at ``step``; the first call moves the rate's origin to ``step``."""
    now = self._clock()
    first_step, first_time = self._first
    if not self._started:
      self._started, self._first = True, (step, now)
    if step <= first_step or now <= first_time:
      return "?"
    seconds = (self.total - step) * (now - first_time) / (step - first_step)
    return str(datetime.timedelta(seconds=round(seconds)))

  def update(self, record: Mapping[str, float]) -> None:
    """Show ``record`` (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``)."""
    step = int(record["step"])
    if not self.bar:
      self._stream.write(f"step {step:6d}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                         f"grad_norm {record['grad_norm']:.3f}  "
                         f"{record['tokens_per_s']:,.0f} tokens/s\n")
      self._stream.flush()
      return
    done = min(1.0, step / self.total)
    filled = round(done * self.width)
    line = (f"step {step}/{self.total} [{'#' * filled}{'-' * (self.width - filled)}] "
            f"{done:4.0%}  loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tokens/s  "
            f"ETA {self._eta(step)}")
    self._stream.write("\r" + line.ljust(self._shown))
    self._stream.flush()
    self._shown = len(line)

  def close(self) -> None:
    """End the bar's line (nothing for plain lines)."""
    if self.bar and self._shown:
      self._stream.write("\n")
      self._stream.flush()
      self._shown = 0
