"""How converters map training-time tensor names to HF names (``Converter.map_keys`` and
``writes_tied`` in ``sa2va_hooks.converters.base``, the rule tables of each family), on lists of
names: no model, no export.

Pinned, with expectations written out by hand from the documented rules:
- the rule machinery, on a declarative table of a test converter: ordered ``key_rules``, first match
  wins and replaces its first occurrence only; ``None`` drops a key on purpose (and post rules do
  not touch it); every ``post_rule`` applies, in order, to every mapped key;
- the refusals: a key no rule maps, an exported name containing ``gamma``/``beta`` (transformers
  renames those on load) and two keys mapped to one name are a ConversionError naming the keys; all
  problems are reported at once; long lists are cut at 20 with a count;
- each shipped family's table on representative keys (its module docstring is the spec: Sa2VA as
  its own ``convert_to_hf.py`` maps it, LLaVA in transformers' layout, InternVL without ``model.``),
  the keys each family refuses, and the tied names each writes as copies;
- ``export._untie_for``: a tied parameter is written as a copy of its twin exactly when the converter
  says the target class does not tie it again (Sa2VA's inner ``lm_head``), else left tied.
"""
from __future__ import annotations

import re

import pytest
import torch

from sa2va_hooks.converters.base import ConversionError, Converter
from sa2va_hooks.converters.causal_lm import CausalLMConverter
from sa2va_hooks.converters.internvl import InternVLConverter
from sa2va_hooks.converters.llava import LlavaConverter
from sa2va_hooks.converters.sa2va import Sa2VAConverter, Sa2VAQwenConverter
from sa2va_hooks.core.plan import _untie_for
from sa2va_hooks.core.merge import ROLE_TRAINABLE, SourceTensor, WalkResult


class TableConverter(Converter):
    """A converter that is only a rule table (never registered)."""

    name = "table"
    key_rules = (
        (r"^backbone\.", "model."),
        (r"^aux\.", None),  # dropped on purpose
        (r"\.0\.", ".zero."),
        (r"^(.*)$", r"\1"),  # everything else as it is
    )
    post_rules = ((r"\.scale$", ".weight"), (r"_", "-"))


# -- the rule machinery ---------------------------------------------------------------------------------

def test_rule_table_first_match_wins_drops_and_post_rules():
    got = TableConverter().map_keys(["backbone.layer_1.scale", "backbone.aux.w", "aux.proj.weight",
                                     "head.0.mlp.0.bias", "plain_name"])
    assert got == {
        "backbone.layer_1.scale": "model.layer-1.weight",  # key rule, then both post rules, every "_"
        "backbone.aux.w": "model.aux.w",                    # the first rule that matches wins
        "aux.proj.weight": None,                            # dropped, not post-processed
        "head.0.mlp.0.bias": "head.zero.mlp.0.bias",        # a key rule replaces its first occurrence only
        "plain_name": "plain-name",                         # post rules apply to every mapped key
    }


def test_the_default_table_keeps_every_name():
    keys = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    assert Converter().map_keys(keys) == {k: k for k in keys}
    assert CausalLMConverter().map_keys(keys) == {k: k for k in keys}


def test_an_unmapped_key_is_an_error_naming_it():
    class Strict(Converter):
        name = "strict"
        key_rules = ((r"^model\.", "model."),)

    with pytest.raises(ConversionError) as e:
        Strict().map_keys(["model.a", "vision.b", "other.c"])
    assert "2 key(s) match no rule of converter 'strict': vision.b, other.c." in str(e.value)


def test_a_long_list_is_cut_at_twenty_with_a_count():
    class Nothing(Converter):
        name = "nothing"
        key_rules = ()

    keys = [f"k{i:02d}" for i in range(25)]
    with pytest.raises(ConversionError) as e:
        Nothing().map_keys(keys)
    msg = str(e.value)
    assert "25 key(s) match no rule" in msg and ", ".join(keys[:20]) + " ... and 5 more" in msg
    assert "k20" not in msg


@pytest.mark.parametrize("key", ["norm.gamma", "norm.beta", "blocks.0.gamma_1", "ln.beta.weight"])
def test_an_exported_name_transformers_would_rename_is_an_error(key):
    with pytest.raises(ConversionError) as e:
        Converter().map_keys(["ok.weight", key])
    assert "1 exported key(s) contain 'gamma' or 'beta'" in str(e.value) and f"{key} -> {key}" in str(e.value)


def test_gamma_dropped_or_mapped_away_is_fine():
    class Away(Converter):
        name = "away"
        key_rules = ((r"^drop\.", None), (r"^(.*)$", r"\1"))
        post_rules = ((r"\.gamma$", ".g_weight"),)

    assert Away().map_keys(["drop.norm.gamma", "keep.gamma"]) == {"drop.norm.gamma": None,
                                                                  "keep.gamma": "keep.g_weight"}


def test_two_keys_mapped_to_one_name_is_an_error_but_two_drops_are_not():
    class Collide(Converter):
        name = "collide"
        key_rules = ((r"^(a|b)\.", "x."), (r"^drop", None))

    with pytest.raises(ConversionError, match=r"several keys map to the same exported name: x\.w;"):
        Collide().map_keys(["a.w", "b.w"])
    assert Collide().map_keys(["drop1", "drop2"]) == {"drop1": None, "drop2": None}


def test_every_problem_is_reported_at_once():
    class Bad(Converter):
        name = "bad"
        key_rules = ((r"^(a|b)\.", "x."), (r"^n\.", "n."))

    with pytest.raises(ConversionError) as e:
        Bad().map_keys(["a.w", "b.w", "zzz", "n.beta"])
    lines = str(e.value).split("\n")
    assert len(lines) == 3
    assert "match no rule" in lines[0] and "zzz" in lines[0]
    assert "'gamma' or 'beta'" in lines[1] and "n.beta -> n.beta" in lines[1]
    assert "several keys map to the same exported name: x.w" in lines[2]


# -- each family's table --------------------------------------------------------------------------------

FAMILY_KEYS = [
    (LlavaConverter, "llm.model.layers.0.self_attn.q_proj.weight",
     "language_model.model.layers.0.self_attn.q_proj.weight"),
    (LlavaConverter, "llm.lm_head.weight", "language_model.lm_head.weight"),
    (LlavaConverter, "visual_encoder.vision_model.embeddings.patch_embedding.weight",
     "vision_tower.vision_model.embeddings.patch_embedding.weight"),
    (LlavaConverter, "projector.model.0.weight", "multi_modal_projector.linear_1.weight"),
    (LlavaConverter, "projector.model.2.bias", "multi_modal_projector.linear_2.bias"),
    (InternVLConverter, "model.vision_model.encoder.layers.0.ls1", "vision_model.encoder.layers.0.ls1"),
    (InternVLConverter, "model.language_model.model.norm.weight", "language_model.model.norm.weight"),
    (InternVLConverter, "model.mlp1.1.weight", "mlp1.1.weight"),
    (Sa2VAConverter, "mllm.model.vision_model.embeddings.class_embedding", "vision_model.embeddings.class_embedding"),
    (Sa2VAConverter, "mllm.model.language_model.lm_head.weight", "language_model.lm_head.weight"),
    (Sa2VAConverter, "mllm.model.mlp1.0.bias", "mlp1.0.bias"),
    (Sa2VAConverter, "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.gamma",
     "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight"),
    (Sa2VAConverter, "text_hidden_fcs.0.weight", "text_hidden_fcs.0.weight"),
    (Sa2VAQwenConverter, "mllm.model.model.language_model.layers.0.mlp.up_proj.weight",
     "model.model.language_model.layers.0.mlp.up_proj.weight"),
    (Sa2VAQwenConverter, "mllm.model.visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
    (Sa2VAQwenConverter, "mllm.model.lm_head.weight", "model.lm_head.weight"),
    (Sa2VAQwenConverter, "grounding_encoder.sam2_model.memory_encoder.fuser.layers.1.gamma",
     "grounding_encoder.sam2_model.memory_encoder.fuser.layers.1.g_weight"),
    (Sa2VAQwenConverter, "text_hidden_fcs.2.bias", "text_hidden_fcs.2.bias"),
]


@pytest.mark.parametrize("cls, key, hf", FAMILY_KEYS, ids=[f"{c.name}:{k}" for c, k, _ in FAMILY_KEYS])
def test_family_maps_a_key(cls, key, hf):
    assert cls().map_keys([key]) == {key: hf}


FAMILY_REFUSED = [
    (LlavaConverter, "llm.score.weight"),  # no rule: not part of LLaVA's layout
    (LlavaConverter, "projector.model.1.weight"),
    (LlavaConverter, "visual_encoder.post_layernorm.weight"),
    (InternVLConverter, "vision_model.embeddings.patch_embedding.weight"),  # without model.
    (InternVLConverter, "model.extra_head.weight"),
    (Sa2VAConverter, "mllm.model.extra.weight"),
    (Sa2VAConverter, "mllm.lm_head.weight"),
    (Sa2VAQwenConverter, "mllm.visual.weight"),
    (Sa2VAQwenConverter, "sam_prompt_encoder.weight"),
]


@pytest.mark.parametrize("cls, key", FAMILY_REFUSED, ids=[f"{c.name}:{k}" for c, k in FAMILY_REFUSED])
def test_family_refuses_a_key_it_has_no_rule_for(cls, key):
    with pytest.raises(ConversionError, match=re.escape(f"1 key(s) match no rule of converter '{cls.name}': {key}.")):
        cls().map_keys([key])


@pytest.mark.parametrize("cls", [Sa2VAConverter, Sa2VAQwenConverter])
def test_sa2va_refuses_a_gamma_inside_a_name(cls):
    """The post rule renames a trailing ``.gamma`` only; one inside a name would still be renamed by
    transformers on load, so it is refused."""
    with pytest.raises(ConversionError, match="contain 'gamma' or 'beta'"):
        cls().map_keys(["grounding_encoder.block.gamma.weight"])


WRITES_TIED = [
    (Sa2VAConverter, "language_model.lm_head.weight", True),
    (Sa2VAConverter, "language_model.model.embed_tokens.weight", False),
    (Sa2VAConverter, "language_model.lm_head.weight_extra", False),
    (Sa2VAConverter, "x.language_model.lm_head.weight", False),
    (Sa2VAConverter, "model.lm_head.weight", False),
    (Sa2VAQwenConverter, "model.lm_head.weight", True),
    (Sa2VAQwenConverter, "language_model.lm_head.weight", False),
    (CausalLMConverter, "lm_head.weight", False),
    (LlavaConverter, "language_model.lm_head.weight", False),
    (InternVLConverter, "language_model.lm_head.weight", False),
]


@pytest.mark.parametrize("cls, hf_name, copy", WRITES_TIED, ids=[f"{c.name}:{n}" for c, n, _ in WRITES_TIED])
def test_which_tied_names_are_written_as_copies(cls, hf_name, copy):
    assert cls().writes_tied(hf_name) is copy


# -- ties: written once, or as a copy where the target does not tie again --------------------------------

def _st(name: str) -> SourceTensor:
    def produce(dtype):  # never called: planning only
        raise AssertionError("planning must not produce data")
    return SourceTensor(name, (8, 4), torch.float32, ROLE_TRAINABLE, (name,), produce)


def test_sa2va_writes_its_tied_lm_head_as_a_copy_of_the_embedding():
    emb, head = "mllm.model.language_model.model.embed_tokens.weight", "mllm.model.language_model.lm_head.weight"
    walk = WalkResult([_st(emb), _st("text_hidden_fcs.0.weight")], tied={head: emb})
    out = _untie_for(Sa2VAConverter(), walk)
    assert [st.name for st in out.tensors] == [emb, "text_hidden_fcs.0.weight", head]
    copy = out.tensors[-1]
    assert copy.shape == (8, 4) and copy.sources == (emb,) and copy._produce is walk.tensors[0]._produce
    assert out.tied == {}


def test_a_causal_lm_keeps_its_tie_and_writes_the_head_once():
    walk = WalkResult([_st("model.embed_tokens.weight")], tied={"lm_head.weight": "model.embed_tokens.weight"})
    out = _untie_for(CausalLMConverter(), walk)
    assert [st.name for st in out.tensors] == ["model.embed_tokens.weight"]
    assert out.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_only_the_tie_the_converter_names_is_undone():
    emb = "mllm.model.language_model.model.embed_tokens.weight"
    other = "grounding_encoder.a.weight"
    walk = WalkResult([_st(emb), _st(other)],
                      tied={"mllm.model.language_model.lm_head.weight": emb, "grounding_encoder.b.weight": other})
    out = _untie_for(Sa2VAConverter(), walk)
    assert [st.name for st in out.tensors][-1] == "mllm.model.language_model.lm_head.weight"
    assert out.tied == {"grounding_encoder.b.weight": other}
    assert out.tensors[-1].role == ROLE_TRAINABLE  # the copy keeps its twin's role
