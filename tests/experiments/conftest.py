"""Shared fixtures of the experiment tests."""

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """A persistent XLA cache in a temporary directory, for one test module.

  Resumed runs compile the programs of the uninterrupted one again; the
  cache turns that into loading them. The process-wide settings are put
  back for the other modules.
  """
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
  )
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update(names[1], 0)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
