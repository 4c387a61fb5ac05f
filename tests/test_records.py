"""records.py: building an xtuner-style ``dict(type=callable, **kwargs)``, as configs give tokenizers."""
from __future__ import annotations

import random

import pytest

from sa2va_hooks.core.errors import BadTypeError
from sa2va_hooks.records import BASELINE_KEY, CHECKPOINT_RECORD_KEY, FROZEN_ROOT_KEY, META_KEY, build_callable_cfg


def test_the_type_is_called_with_the_other_keys_and_the_cfg_is_untouched():
    kwargs = {f"k{i}": random.random() for i in range(3)}
    cfg = dict(type=lambda **kw: ("built", kw), **kwargs)
    before = dict(cfg)
    assert build_callable_cfg(cfg) == ("built", kwargs)
    assert cfg == before


def test_a_lazy_object_is_built_first():
    class Lazy:
        def build(self):
            return dict

    assert build_callable_cfg(dict(type=Lazy(), a=1)) == {"a": 1}


def test_a_type_that_cannot_be_called_is_refused_naming_it():
    with pytest.raises(BadTypeError, match=r"its 'type' must be a class or function .* got 'AutoTokenizer'"):
        build_callable_cfg(dict(type="AutoTokenizer", path="x"))


def test_record_keys_are_distinct_and_namespaced():
    keys = [BASELINE_KEY, FROZEN_ROOT_KEY, META_KEY, CHECKPOINT_RECORD_KEY]
    assert len(set(keys)) == 4 and all(k.startswith("sa2va_hooks") for k in keys)
