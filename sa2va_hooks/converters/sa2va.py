"""Sa2VA, recognised by structure (Sa2VA is not a pip package): both codebases, every family.

Training tree -> HF tree, as Sa2VA's own ``tools/convert_to_hf.py`` maps it:
- InternVL (v1 ``projects/llava_sam2``; v2 ``projects/sa2va`` with InternVL2.5/InternVL3):
  ``mllm.model.{vision_model,language_model,mlp1}.*`` -> ``{vision_model,language_model,mlp1}.*``;
- Qwen-VL (v2, Qwen2.5-VL and Qwen3-VL; the LoRA wraps the whole ``Qwen*VLForConditionalGeneration``
  at ``mllm.model``): ``mllm.model.*`` -> ``model.*``;
- ``grounding_encoder.*`` and ``text_hidden_fcs.*`` are kept;
- ``.gamma`` -> ``.g_weight``: SAM2's memory encoder has ``gamma`` layer scales, which transformers
  would silently rename to ``weight`` on load; Sa2VA's HF code names them ``g_weight``.

config.json is the base model's config (the live ``mllm.model.config``, or the base directory's
config.json it came from), with what Sa2VA's converter sets: ``model_type`` and ``auto_map`` read
from the classes that ``hf_code_dir`` defines (never from a path substring), the run's ``template``,
the vocabulary size of the trained embedding, the tie flags off (the LLM's ``lm_head`` is written,
as a copy where it was tied), the dtype of the tensors as written, and no attention setting of the
training machine.

Where Sa2VA's converter is loose we are strict (docs/decisions.md): it drops the result of
``load_state_dict(strict=False)``, swallows merge errors with a bare ``except``, and picks the
Qwen3-VL code by a substring of the base model's path.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from .base import CONVERTERS, ConversionError, Converter, SnapshotContext, set_dtype
from .helpers import (base_config_dict, copy_remote_code, embedding_rows, set_llm_vocab, strip_machine_settings,
                      unwrap_hf)
from .remote_code import RemoteCode, RemoteCodeError, read_remote_code, read_template_names

SA2VA_MODEL_TYPE = "sa2va_chat"  # what every Sa2VA HF config class declares


@dataclasses.dataclass(frozen=True)
class QwenFamily:
    """A Qwen-VL family of Sa2VA's model zoo: the config class Sa2VA's HF code for it derives from, and
    where that code lives in Sa2VA's repository (for the advice when it is missing or another's)."""

    name: str
    config_base: str
    official_folder: str | None


QWEN_FAMILIES = {  # keyed by the base config's model_type
    "qwen2_5_vl": QwenFamily("Qwen2.5-VL", "Qwen2_5_VLConfig", "projects/sa2va/hf/models_qwen2_5_vl"),
    "qwen3_vl": QwenFamily("Qwen3-VL", "Qwen3VLConfig", "projects/sa2va/hf/models_qwen3vl"),
    "qwen2_vl": QwenFamily("Qwen2-VL", "Qwen2VLConfig", None),
}
INTERNVL_FOLDER = "projects/sa2va/hf/models"  # codebase v1: projects/llava_sam2/hf/models


@CONVERTERS.register_module(name="sa2va")
class Sa2VAConverter(Converter):
    name = "sa2va"
    priority = 100
    key_rules = (
        (r"^mllm\.model\.(vision_model|language_model|mlp1)\.", r"\1."),
        (r"^(grounding_encoder|text_hidden_fcs)\.", r"\1."),
    )
    post_rules = ((r"\.gamma$", ".g_weight"),)
    # Sa2VA's config forces tie_word_embeddings=False and never ties the inner LLM again, so a tied
    # LLM's lm_head must be in the files, or it loads as uninitialised memory
    write_tied = (r"^language_model\.lm_head\.weight$",)
    lm_head = "language_model.lm_head.weight"
    template_table = "templates.PROMPT_TEMPLATE"  # Sa2VAChatModel.__init__ looks config.template up there
    required_tokens = ("[SEG]",)
    v1_note = "; with Sa2VA's first codebase (magic-research/Sa2VA) it is projects/llava_sam2/hf/models"

    def __init__(self, *, hf_code_dir: str | None = None, template: str | None = None,
                 auto_map: dict | None = None, architectures: list[str] | None = None,
                 base_config: str | None = None, tokenizer: Any = None, model_type: str | None = None) -> None:
        super().__init__(tokenizer=tokenizer)
        self.hf_code_dir = hf_code_dir
        self.template = template
        self.model_type = model_type
        self.explicit_auto_map = dict(auto_map) if auto_map else None
        self.architectures = architectures
        self.base_config = base_config
        self._code: RemoteCode | None = None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(getattr(model, "mllm", None), "model", None)
        return (inner is not None and all(hasattr(inner, a) for a in ("vision_model", "language_model", "mlp1"))
                and hasattr(model, "grounding_encoder") and hasattr(model, "text_hidden_fcs"))

    # -- what the snapshot's config names, decided before anything is written ---------------------
    def remote_code(self, model: nn.Module | None = None) -> RemoteCode:
        if self._code is None:
            if not self.hf_code_dir:
                raise ConversionError(
                    f"converter '{self.name}' writes a config.json whose auto_map names Sa2VA's HF code, and no "
                    "hf_code_dir was given, so the snapshot could not be loaded. Pass converter=dict(type="
                    f"'{self.name}', hf_code_dir='<your Sa2VA checkout>/{self.code_folder_hint(model)}') to "
                    f"HFExportHook{self.v1_note} (tools/export.py takes the config's HFExportHook settings, or "
                    "--hf-code-dir).")
            self._code = read_remote_code(self.hf_code_dir)
        return self._code

    def code_folder_hint(self, model: nn.Module | None = None) -> str:
        return INTERNVL_FOLDER

    def auto_map(self) -> dict[str, str]:
        if self.explicit_auto_map:
            return dict(self.explicit_auto_map)
        return self.remote_code().auto_map(self.model_type or SA2VA_MODEL_TYPE)

    def written_model_type(self) -> str:
        """The model_type of the config class auto_map names, as that class declares it."""
        if self.model_type:
            return self.model_type
        declared = self.remote_code().find(self.auto_map()["AutoConfig"]) if self.hf_code_dir else None
        return (declared.model_type if declared and declared.model_type else SA2VA_MODEL_TYPE)

    def template_for(self, model: nn.Module, cfg: dict | None = None) -> Any:
        """The converter's ``template``, else the model's (v1 keeps it on the model; v2's is None), else
        the run config's top-level ``template`` (every v2 config has one), else the base config's."""
        template = self.template or getattr(model, "template", None) or self.run_template
        if template is None and cfg is not None:
            template = cfg.get("template")
        return template.get("name", template) if isinstance(template, dict) else template

    def check_ready(self, model: nn.Module) -> None:
        problems = []
        try:
            code = self.remote_code(model)
            auto_map = self.auto_map()
            missing = code.missing(auto_map)
            if missing:
                problems.append(f"hf_code_dir {self.hf_code_dir} does not define {missing}, which auto_map names; "
                                f"point hf_code_dir at {self.code_folder_hint(model)} of a Sa2VA checkout, or pass "
                                "the auto_map that the code defines")
            problems += self.family_problems(model, code, auto_map)
        except (ConversionError, RemoteCodeError) as e:
            problems.append(str(e))
        problems += self.template_problems(model)
        problems += self.tokenizer_problems(model)
        if problems:
            raise ConversionError(f"converter '{self.name}' cannot export this model (nothing was written):\n- "
                                  + "\n- ".join(problems))

    def describe(self, model: nn.Module) -> str:
        template = self.template_for(model)
        origin = ("given" if self.template else "the model's" if getattr(model, "template", None) else
                  "the config's" if self.run_template else "the base config's")
        return (f"{super().describe(model)}; template {template!r} ({origin}); code {self.hf_code_dir} "
                f"(auto_map {self.auto_map()['AutoModel']}, model_type {self.written_model_type()!r})")

    def family_problems(self, model: nn.Module, code: RemoteCode, auto_map: dict[str, str]) -> list[str]:
        return []

    def template_problems(self, model: nn.Module) -> list[str]:
        if not self.template_table or not self.hf_code_dir:
            return []
        known = read_template_names(self.hf_code_dir, self.template_table)
        if known is None:  # not a literal table: the load check runs the code and decides
            return []
        template = self.template_for(model, self._base_config_dict(model))
        if isinstance(template, str) and (template in known or template.replace("-", "_") in known):
            return []
        return [f"template {template!r} is not one Sa2VA's HF code knows ({self.template_table} in "
                f"{self.hf_code_dir}: {', '.join(sorted(known))}); set the config's top-level template (as every "
                f"Sa2VA config does) or pass converter=dict(type='{self.name}', template=NAME, ...)"]

    def model_tokenizer(self, model: nn.Module) -> Any:
        """v1 keeps the tokenizer (with ``[SEG]``) on the model, v2 on its mllm wrapper."""
        own = getattr(model, "tokenizer", None)
        return own if own is not None else getattr(getattr(model, "mllm", None), "tokenizer", None)

    # -- config.json and the files beside it -----------------------------------------------------
    def _base_config_dict(self, model: nn.Module) -> dict:
        cfg = getattr(unwrap_hf(model.mllm.model), "config", None)
        if cfg is None and not self.base_config:
            raise ConversionError(f"the Sa2VA mllm has no .config to build config.json from; pass "
                                  f"converter=dict(type='{self.name}', base_config='BASE_DIR/config.json').")
        return base_config_dict(cfg, self.base_config)

    def hf_config(self, model: nn.Module, ctx: SnapshotContext) -> dict:
        cfg = self._base_config_dict(model)
        if "llm_config" not in cfg:
            raise ConversionError("the base config has no 'llm_config'; an InternVL-style Sa2VA config is expected. "
                                  "Use converter 'sa2va_qwen' for Qwen-VL-style mllms.")
        set_llm_vocab(cfg, embedding_rows(model.mllm.model.language_model), ctx)
        self._set_identity(cfg, model)
        set_dtype(cfg, ctx, "llm_config")
        strip_machine_settings(cfg, ctx)
        self._untie(cfg, ctx, ("llm_config",))
        return cfg

    def _untie(self, cfg: dict, ctx: SnapshotContext, subs: tuple[str, ...]) -> None:
        """tie_word_embeddings False at the top and in the LLM's sub-config, as Sa2VA's converter writes
        it: Sa2VA's model never ties the LLM again on load, so the lm_head is in the files. The note
        says so only where a tie really was undone."""
        where = [k for k in ("", *subs) if (cfg if not k else cfg.get(k, {})).get("tie_word_embeddings")]
        cfg["tie_word_embeddings"] = False
        for sub in subs:
            if isinstance(cfg.get(sub), dict):
                cfg[sub]["tie_word_embeddings"] = False
        if where and self.lm_head in ctx.names:
            names = ", ".join(f"{k}.tie_word_embeddings" if k else "tie_word_embeddings" for k in where)
            ctx.notes.append(f"{names} set to False: Sa2VA's model does not tie the LLM on load, so {self.lm_head} "
                             "is written (a copy of the input embedding where the two were one tensor)")

    def _set_identity(self, cfg: dict, model: nn.Module) -> None:
        """template, auto_map, architectures and model_type, as Sa2VA's converter writes them."""
        cfg["template"] = self.template_for(model, cfg)
        auto_map = self.auto_map()
        cfg["auto_map"] = auto_map
        cfg["architectures"] = list(self.architectures or [auto_map["AutoModel"].rsplit(".", 1)[-1]])
        cfg["model_type"] = self.written_model_type()

    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None:
        copy_remote_code(self.hf_code_dir, out_dir, ctx, required=True)
        super().save_extras(model, out_dir, ctx)


@CONVERTERS.register_module(name="sa2va_qwen")
class Sa2VAQwenConverter(Sa2VAConverter):
    """Sa2VA whose mllm is Qwen-VL-style (v2's Qwen2.5-VL and Qwen3-VL: ``mllm.model`` is a
    ``Qwen*VLForConditionalGeneration``, with ``visual``, LoRA around all of it): keys drop ``mllm.``;
    the vocabulary size is set in ``text_config`` (and at the top level where the config keeps one);
    the processor (``mllm.processor``) is saved."""

    name = "sa2va_qwen"
    priority = 100
    write_tied = (r"^model\.lm_head\.weight$",)
    lm_head = "model.lm_head.weight"
    v1_note = ""  # Qwen-VL exists in codebase v2 only
    template_table = None  # Sa2VA's Qwen-VL code uses the processor's chat template, not PROMPT_TEMPLATE
    key_rules = (
        (r"^mllm\.model\.", "model."),
        (r"^(grounding_encoder|text_hidden_fcs)\.", r"\1."),
    )

    def __init__(self, *, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.processor = processor

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(getattr(model, "mllm", None), "model", None)
        if inner is None or not (hasattr(model, "grounding_encoder") and hasattr(model, "text_hidden_fcs")):
            return False
        vl = unwrap_hf(inner)
        # transformers < 4.52: ``visual`` on the conditional-generation model; 4.52-4.57 also a property
        # there; 5: only on its ``model``
        return hasattr(vl, "visual") or hasattr(getattr(vl, "model", None), "visual")

    @staticmethod
    def family(model: nn.Module) -> tuple[str | None, QwenFamily | None]:
        # the config class's own model_type: transformers 4.57's Qwen2.5-VL config answers attribute reads
        # from its text_config first, so ``config.model_type`` reads 'qwen2_5_vl_text'
        cfg = getattr(unwrap_hf(model.mllm.model), "config", None)
        model_type = getattr(type(cfg), "model_type", None) or getattr(cfg, "model_type", None)
        return model_type, QWEN_FAMILIES.get(model_type)

    def code_folder_hint(self, model: nn.Module | None = None) -> str:
        fam = self.family(model)[1] if model is not None else None
        if fam and fam.official_folder:
            return fam.official_folder
        return " or ".join(f.official_folder for f in QWEN_FAMILIES.values() if f.official_folder)

    def family_problems(self, model: nn.Module, code: RemoteCode, auto_map: dict[str, str]) -> list[str]:
        """The code must be the HF code of the model's own family: Sa2VA's Qwen2.5-VL and Qwen3-VL
        folders define classes of the same names over different Qwen classes."""
        model_type, fam = self.family(model)
        declared = code.find(auto_map.get("AutoConfig", ""))
        if fam is None or declared is None or fam.config_base in declared.bases:
            return []
        other = next((f for f in QWEN_FAMILIES.values() if f.config_base in declared.bases), None)
        return [f"hf_code_dir {self.hf_code_dir} is {'the HF code of ' + other.name if other else 'HF code'} "
                f"({declared.ref} derives from {', '.join(declared.bases)}), but the model is {fam.name} "
                f"(model_type {model_type!r}); pass hf_code_dir='<your Sa2VA checkout>/{fam.official_folder}'"]

    def model_processor(self, model: nn.Module) -> Any:
        for owner in (model, getattr(model, "mllm", None)):
            proc = getattr(owner, "processor", None)
            if proc is not None:
                return proc
        return None

    def hf_config(self, model: nn.Module, ctx: SnapshotContext) -> dict:
        cfg = self._base_config_dict(model)
        rows = embedding_rows(model.mllm.model)
        # where the config keeps the LLM's vocabulary: text_config (transformers >= 4.51), the top level
        # (older ones, where a text_config dict would break the config class), or both
        places = [w for w in ("text_config", None) if isinstance(cfg.get(w) if w else cfg, dict)
                  and "vocab_size" in (cfg.get(w) if w else cfg)] or ["text_config" if "text_config" in cfg else None]
        for where in places:
            sub = cfg.get(where) if where else cfg
            if isinstance(sub, dict):
                if sub.get("vocab_size") != rows:
                    ctx.notes.append(f"{where + '.' if where else ''}vocab_size set from {sub.get('vocab_size')} "
                                     f"to {rows}, the embedding rows")
                sub["vocab_size"] = rows
        self._set_identity(cfg, model)
        set_dtype(cfg, ctx, "text_config")
        strip_machine_settings(cfg, ctx)
        self._untie(cfg, ctx, ("text_config",))
        return cfg

    def save_extras(self, model: nn.Module, out_dir: Path, ctx: SnapshotContext) -> None:
        proc = self.processor if self.processor is not None else self.model_processor(model)
        if isinstance(proc, (str, Path)):
            from transformers import AutoProcessor
            proc = AutoProcessor.from_pretrained(str(proc), trust_remote_code=True)
        if proc is not None:
            proc.save_pretrained(str(out_dir))
        elif self.resolve_tokenizer(model) is None:
            ctx.notes.append("no processor or tokenizer was given; the snapshot cannot tokenize or read images")
        super().save_extras(model, out_dir, ctx)
