"""Tests for the background batch builder."""

import threading
import time

import pytest

from experiments.runtime import prefetch


class Recorder:
  """A stateful builder: each result depends on every earlier call."""

  def __init__(self, fail_at=None, delay=0.0):
    self.calls, self.total = [], 0
    self.threads = set()
    self.fail_at, self.delay = fail_at, delay

  def __call__(self, item):
    self.threads.add(threading.get_ident())
    if item == self.fail_at:
      raise ValueError(f"bad item {item}")
    time.sleep(self.delay)
    self.calls.append(item)
    self.total += item
    return (item, self.total)


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_same_results_and_calls_as_a_plain_loop(depth):
  plain = Recorder()
  expected = [plain(i) for i in range(10)]
  ahead = Recorder()
  got = list(prefetch.build_ahead(ahead, range(10), depth=depth))
  assert got == expected
  assert ahead.calls == list(range(10))


def test_builds_on_one_other_thread_and_overlaps_the_consumer():
  builder = Recorder(delay=0.05)
  start = time.perf_counter()
  for _ in prefetch.build_ahead(builder, range(10), depth=2):
    time.sleep(0.05)  # the "device step"
  elapsed = time.perf_counter() - start
  assert builder.threads == {next(iter(builder.threads))}
  assert threading.get_ident() not in builder.threads
  # Serial would be 20 x 0.05 s; overlapped about 11 x 0.05 s.
  assert elapsed < 0.8


def test_error_is_raised_at_its_item():
  got = []
  with pytest.raises(ValueError, match="bad item 3"):
    for out in prefetch.build_ahead(Recorder(fail_at=3), range(6), depth=2):
      got.append(out[0])
  assert got == [0, 1, 2]


def test_early_exit_stops_building_and_leaves_no_thread():
  builder = Recorder(delay=0.02)
  for item, _ in prefetch.build_ahead(builder, range(100), depth=3):
    if item == 2:
      break
  # Closed by garbage collection of the generator at the break.
  assert len(builder.calls) <= 2 + 3 + 1
  time.sleep(0.05)
  assert not [t for t in threading.enumerate() if "build_ahead" in t.name]


def test_lazy_items_are_consumed_only_as_needed():
  pulled = []

  def items():
    for i in range(100):
      pulled.append(i)
      yield i

  gen = prefetch.build_ahead(Recorder(), items(), depth=2)
  assert next(gen) == (0, 0)
  assert len(pulled) <= 3
  gen.close()


def test_negative_depth_is_an_error():
  with pytest.raises(ValueError, match="depth"):
    list(prefetch.build_ahead(Recorder(), range(3), depth=-1))
