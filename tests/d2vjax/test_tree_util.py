"""Key-path names: every key kind of `jax.tree_util`."""

import dataclasses

import jax
import numpy as np

from d2vjax import tree_util


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Pair:
  left: jax.Array
  right: jax.Array


class _Opaque:
  """A pytree node registered without keys: its paths use flat indices."""

  def __init__(self, a, b):
    self.a, self.b = a, b


jax.tree_util.register_pytree_node(
  _Opaque, lambda o: ((o.a, o.b), None), lambda _, c: _Opaque(*c)
)


def _paths(tree):
  return [
    tree_util.path_names(path)
    for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


def test_every_key_kind():
  tree = {
    "encoder": {"layers_0": {"kernel": 1, "bias": 2}},
    "stack": [3, (4, 5)],
    "pair": _Pair(np.zeros(2), np.ones(2)),
    "opaque": _Opaque(6, 7),
  }
  assert sorted(_paths(tree)) == sorted(
    [
      ("encoder", "layers_0", "kernel"),
      ("encoder", "layers_0", "bias"),
      ("stack", "0"),
      ("stack", "1", "0"),
      ("stack", "1", "1"),
      ("pair", "left"),
      ("pair", "right"),
      ("opaque", "0"),
      ("opaque", "1"),
    ]
  )


def test_path_name_joins():
  tree = {"encoder": {"layers_0": [np.zeros(1)]}}
  [(path, _)] = jax.tree_util.tree_leaves_with_path(tree)
  assert tree_util.path_name(path) == "encoder/layers_0/0"
  assert tree_util.path_name(path, sep=".") == "encoder.layers_0.0"
  assert tree_util.path_name(()) == ""
  assert tree_util.path_names(()) == ()


def test_non_string_dict_keys():
  [(path, _)] = jax.tree_util.tree_leaves_with_path({3: {None: 1}})
  assert tree_util.path_names(path) == ("3", "None")
