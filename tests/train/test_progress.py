"""Progress on stdout: a ``\\r`` bar with ETA on a terminal, plain lines otherwise."""

import io

from nlj.train.progress import Progress


class FakeTerminal(io.StringIO):

  def isatty(self) -> bool:
    return True


def _record(step: int, loss: float) -> dict:
  return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.6,
          "mfu": None, "memory_bytes": None}


def _clock(*times: float):
  ticks = iter(times)
  return lambda: next(ticks)


def test_plain_lines_when_not_a_terminal():
  stream = io.StringIO()
  progress = Progress(100, stream=stream, clock=_clock(0.0))
  progress.update(_record(10, 2.5))
  progress.update(_record(20, 2.25))
  progress.close()
  assert not progress.bar
  assert stream.getvalue() == (
      "step     10  loss 2.5000  lr 1.00e-03  grad_norm 0.500  12,346 tokens/s\n"
      "step     20  loss 2.2500  lr 1.00e-03  grad_norm 0.500  12,346 tokens/s\n")


def test_bar_with_eta_on_a_terminal():
  stream = FakeTerminal()
  # made at t=0; records at t=5 (step 10, compilation included), t=7 (step 20), t=9 (step 100)
  progress = Progress(100, stream=stream, clock=_clock(0.0, 5.0, 7.0, 9.0), width=10)
  assert progress.bar
  progress.update(_record(10, 2.5))
  first = stream.getvalue()
  assert first == ("\rstep 10/100 [#---------]  10%  loss 2.5000  12,346 tokens/s  "
                   "ETA 0:00:45")  # 90 steps at 10 steps / 5 s
  progress.update(_record(20, 2.25))
  second = stream.getvalue()[len(first):]
  # 80 steps at 10 steps / 2 s (the rate since the first record, after compilation)
  assert second == "\rstep 20/100 [##--------]  20%  loss 2.2500  12,346 tokens/s  ETA 0:00:16"
  progress.update(_record(100, 2.0))
  assert stream.getvalue().endswith("[##########] 100%  loss 2.0000  12,346 tokens/s  ETA 0:00:00")
  assert "\n" not in stream.getvalue()
  progress.close()
  assert stream.getvalue().endswith("\n")


def test_bar_of_a_resumed_run_and_a_shorter_line_clears_the_longer():
  stream = FakeTerminal()
  progress = Progress(1000, start=500, stream=stream, clock=_clock(0.0, 10.0, 20.0), width=4)
  progress.update({**_record(600, 10.0), "tokens_per_s": 1e6})
  long_line = stream.getvalue()
  assert long_line.endswith("ETA 0:00:40")  # 400 steps at 100 steps / 10 s
  progress.update(_record(700, 2.0))
  short_line = stream.getvalue()[len(long_line):]
  assert short_line.startswith("\rstep 700/1000 [###-]  70%") and short_line.endswith(" ")
  assert len(short_line) == len(long_line)  # padded over the longer line's characters
