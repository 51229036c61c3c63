"""SIGTERM handling shared by the training loops.

A preempted job gets SIGTERM some seconds before it is killed; the loops
check `Preemption.reached(step)` after every step and, when it is True,
checkpoint and return.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """Tells the loop when SIGTERM asks it to checkpoint and stop.

  One process: a Python SIGTERM handler sets a flag. Several processes
  (`jax.distributed` initialised): JAX's preemption service owns SIGTERM
  and picks one step at which every process stops
  (`multihost_utils.reached_preemption_sync_point`), so that no process
  waits in a collective for one that has already left.
  """

  def __init__(self) -> None:
    self.requested = False
    self._multi = jax.distributed.is_initialized()
    self._previous = None

  def install(self) -> None:
    if self._multi or threading.current_thread() is not threading.main_thread():
      return
    self._previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
      del signum, frame
      logging.warning("SIGTERM: checkpointing and stopping")
      self.requested = True

    signal.signal(signal.SIGTERM, handler)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested
