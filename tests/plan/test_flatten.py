"""Flattening state dicts: keys, paths, refusals, and rebuilding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardsave.errors import UnsupportedValueError
from shardsave.plan.flatten import PerRank, flatten, unflatten

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=5))
keys = st.text(alphabet="abcxyz_", min_size=1, max_size=4)
trees = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, min_size=1, max_size=3),
                               st.dictionaries(keys, children, min_size=1, max_size=3)),
    max_leaves=12,
)


@settings(deadline=None, max_examples=200)
@given(st.dictionaries(keys, trees, min_size=1, max_size=4))
def test_flatten_unflatten_round_trip(state: dict) -> None:
    leaves = flatten(state)
    assert unflatten((leaf.path, leaf.value) for leaf in leaves) == state


def test_paths_keys_and_per_rank_roots() -> None:
    sd = {"model": {"a.w": torch.ones(2)}, "opt": {"state": {0: {"step": 3}}}, "rng": PerRank({"t": torch.ones(1)})}
    leaves = {leaf.key: leaf for leaf in flatten(sd)}
    assert leaves["model.a.w"].path == ("model", "a.w")
    assert leaves["opt.state.0.step"].path == ("opt", "state", ("int", 0), "step")
    assert leaves["rng.t"].per_rank_root == 1
    assert leaves["model.a.w"].per_rank_root is None


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (object(), "builtins.object"),
        (torch.ones(2).to_sparse(), "layout"),
        (np.array(["a"]), "numpy dtype"),
        ({1.5: 2}, "dict keys must be str or int"),
    ],
)
def test_unsupported_values_name_the_key(value: object, needle: str) -> None:
    with pytest.raises(UnsupportedValueError, match=needle) as info:
        flatten({"model": {"bad": value}})
    assert "state_dict['model']['bad']" in str(info.value)


def test_colliding_keys_are_refused() -> None:
    with pytest.raises(UnsupportedValueError, match=r"both flatten to the key 'a\.b'"):
        flatten({"a.b": 1, "a": {"b": 2}})


def test_cycles_are_refused() -> None:
    sd: dict = {"a": {}}
    sd["a"]["self"] = sd["a"]
    with pytest.raises(UnsupportedValueError, match="contains itself"):
        flatten(sd)
