"""A training model shaped like Sa2VA v2's ``projects/sa2va/models/sa2va.py`` ``Sa2VAModel``, tiny,
with fresh random weights (tests cannot reach the official code or weights).

What it copies from v2, because an export depends on each:
- ``mllm`` is a wrapper per family holding ``model``, ``tokenizer`` (with ``[SEG]`` and v2's other
  special tokens added, embeddings resized to ``len(tokenizer)``) and, for Qwen, ``processor``;
  ``Sa2VAModel`` itself has no tokenizer, and its ``template`` is None (the run config has one);
- InternVL (InternVL2.5/InternVL3, ``mllm/internvl.py``): ``model`` is an InternVL chat model
  (``vision_model``, ``mlp1``, ``language_model``), the LoRA wraps ``model.language_model`` only;
- Qwen2.5-VL / Qwen3-VL (``mllm/qwenvl.py``, ``mllm/qwen3vl.py``): ``model`` is the whole
  ``Qwen*VLForConditionalGeneration`` wrapped by ``get_peft_model``, LoRA on every Linear of the
  language model, ``modules_to_save=['lm_head', 'embed_tokens']``;
- a SAM2 ``grounding_encoder`` whose mask decoder trains (``gamma`` layer scales as SAM2 names
  them), a trainable ``text_hidden_fcs``, and a ``state_dict`` that saves only the trainable parts.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch import nn

from ..tiny_sa2va import SeededSamples, _tiny_tokenizer

HERE = Path(__file__).parent
HF_CODE = {"internvl": HERE / "hf_internvl", "qwen2_5_vl": HERE / "hf_qwen2_5_vl", "qwen3_vl": HERE / "hf_qwen3vl"}
SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]  # v2's configs add these
TEMPLATE = "qwen_chat"  # every v2 config's top-level template
FAMILIES = tuple(HF_CODE)
N_WORDS = 60


def qwen3_vl_available() -> bool:
    try:
        from transformers import Qwen3VLForConditionalGeneration  # noqa: F401
    except ImportError:
        return False
    return True


# -- SAM2 as the training code names it --------------------------------------------------------
class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))


class Sam2Model(nn.Module):
    def __init__(self, dim: int = 16, patch: int = 4) -> None:
        super().__init__()
        self.image_encoder = nn.Conv2d(3, dim, patch, patch)
        self.memory_encoder = nn.Module()
        self.memory_encoder.fuser = nn.Module()
        self.memory_encoder.fuser.layers = nn.ModuleList([LayerScale(dim)])
        self.sam_mask_decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def mask_logits(self, pixel_values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        feats = self.image_encoder(pixel_values) * self.memory_encoder.fuser.layers[0].gamma.view(1, -1, 1, 1)
        return torch.einsum("bdhw,bd->bhw", feats, self.sam_mask_decoder(query))


class SAM2TrainRunner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sam2_model = Sam2Model()


# -- base models, written once like a downloaded base directory ---------------------------------
def _llm_dims(vocab: int, tie: bool) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tie)


def make_base(family: str, base_dir: str | Path, seed: int = 21) -> Path:
    """A base model directory (config, weights, tokenizer) of ``family``, like a downloaded
    InternVL3 / Qwen2.5-VL-3B / Qwen3-VL-2B: the Qwen2.5-VL one ties its embeddings, as the 3B does."""
    base_dir = Path(base_dir)
    if (base_dir / "config.json").is_file():
        return base_dir
    tok = _tiny_tokenizer(N_WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_base(family, len(tok))
    model.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    return base_dir


def _build_base(family: str, vocab: int) -> nn.Module:
    if family == "internvl":
        from ..internvl_code.configuration_tiny_internvl import TinyInternVLConfig
        from ..internvl_code.modeling_tiny_internvl import TinyInternVLChatModel
        llm = _llm_dims(vocab, tie=False)
        return TinyInternVLChatModel(TinyInternVLConfig(llm_config=llm, template="internvl2_5",
                                                        architectures=["InternVLChatModel"]))
    text = {**_llm_dims(vocab, tie=family == "qwen2_5_vl")}
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 1, 1]}
        import inspect
        # transformers < 4.51 keeps the LLM's settings at the top level only (no text_config)
        has_text_config = "text_config" in inspect.signature(Qwen2_5_VLConfig.__init__).parameters
        nested = {"text_config": text} if has_text_config else {}
        cfg = Qwen2_5_VLConfig(vision_config={**vision, "fullatt_block_indexes": [0]}, image_token_id=2,
                               video_token_id=3, vision_start_token_id=1, **nested, **text)
        return Qwen2_5_VLForConditionalGeneration(cfg)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    text.update(head_dim=8,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    cfg = Qwen3VLConfig(text_config=text, vision_config={**vision, "deepstack_visual_indexes": [0],
                                                         "num_position_embeddings": 16},
                        image_token_id=2, video_token_id=3)
    return Qwen3VLForConditionalGeneration(cfg)


# -- the mllm wrappers ---------------------------------------------------------------------------
class _MLLM(nn.Module):
    """What every v2 wrapper holds: ``model``, ``tokenizer`` (``processor`` for Qwen)."""

    def add_special_tokens(self, tokenizer, special_tokens: list[str]) -> None:
        tokenizer.add_tokens(special_tokens, special_tokens=True)
        self.resize_target().resize_token_embeddings(len(tokenizer))
        self.tokenizer = tokenizer


class InternVLMLLM(_MLLM):
    """v2 ``mllm/internvl.py``: LoRA on ``model.language_model`` (xtuner's _prepare_llm_for_lora)."""

    def __init__(self, base_dir: Path, lora_r: int) -> None:
        super().__init__()
        from ..internvl_code.modeling_tiny_internvl import TinyInternVLChatModel
        self.model = TinyInternVLChatModel.from_pretrained(str(base_dir))
        self.tokenizer = self.processor = None
        self.lora_r = lora_r
        self.modules_to_save: list[str] | None = ["lm_head", "embed_tokens"]  # v2's

    def resize_target(self) -> nn.Module:
        return self.model.language_model

    def manual_prepare_llm_for_lora(self) -> None:
        from peft import LoraConfig, get_peft_model
        self.model.requires_grad_(False)
        self.model.language_model = get_peft_model(self.model.language_model, LoraConfig(
            r=self.lora_r, lora_alpha=2 * self.lora_r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            modules_to_save=self.modules_to_save))

    def hidden_and_logits(self, pixel_values, input_ids):
        m = self.model
        img = m.mlp1(m.vision_model(pixel_values))
        txt = m.language_model.get_input_embeddings()(input_ids)
        out = m.language_model(inputs_embeds=torch.cat([img, txt], dim=1), output_hidden_states=True)
        n = img.shape[1]
        return out.hidden_states[-1][:, n:], out.logits[:, n:]


class QwenVLMLLM(_MLLM):
    """v2 ``mllm/qwenvl.py`` / ``mllm/qwen3vl.py``: ``get_peft_model`` around the whole VL model, LoRA
    on every Linear of its language model, ``modules_to_save=['lm_head', 'embed_tokens']``."""

    def __init__(self, base_dir: Path, family: str, lora_r: int) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessor
        del family  # the base directory's config says which class
        self.model = AutoModelForImageTextToText.from_pretrained(str(base_dir), attn_implementation="eager")
        self.tokenizer = None
        self.processor = Qwen2VLImageProcessor()
        self.lora_r = lora_r
        self.modules_to_save: list[str] | None = ["lm_head", "embed_tokens"]  # v2's

    def resize_target(self) -> nn.Module:
        return self.model

    def manual_prepare_llm_for_lora(self) -> None:
        from peft import LoraConfig, get_peft_model
        self.model.requires_grad_(False)
        text = self.model.get_decoder()
        text_prefix = next(n for n, m in self.model.named_modules() if m is text)
        targets = [f"{text_prefix}.{n}" for n, m in text.named_modules() if isinstance(m, nn.Linear)]
        self.model = get_peft_model(self.model, LoraConfig(
            r=self.lora_r, lora_alpha=2 * self.lora_r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=targets, modules_to_save=self.modules_to_save))

    def hidden_and_logits(self, pixel_values, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        return out.hidden_states[-1], out.logits


@MODELS.register_module()
class Sa2VAModelV2(BaseModel):
    """v2's ``Sa2VAModel``: build the mllm, add the special tokens, then SAM2 and the fcs, then the
    LoRA; ``template`` is None, as in v2 (the run config's top-level ``template`` is the one)."""

    def __init__(self, family: str, root: str, lora_r: int = 4, seed: int = 0,
                 modules_to_save: list[str] | None = ("lm_head", "embed_tokens"),
                 data_preprocessor: dict | None = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        if family not in FAMILIES:
            raise ValueError(f"family {family!r}; known: {FAMILIES}")
        base_dir = make_base(family, Path(root) / f"base_{family}")
        self.arch_type = "intern_vl" if family == "internvl" else "qwen"
        self.template = None
        self.mllm = InternVLMLLM(base_dir, lora_r) if family == "internvl" else QwenVLMLLM(base_dir, family, lora_r)
        self.mllm.modules_to_save = list(modules_to_save) if modules_to_save else None
        from transformers import AutoTokenizer
        self.mllm.add_special_tokens(AutoTokenizer.from_pretrained(str(base_dir)), SPECIAL_TOKENS)
        self.seg_token_idx = self.mllm.tokenizer.convert_tokens_to_ids("[SEG]")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7)
            self.grounding_encoder = SAM2TrainRunner()
            hidden = 32
            self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                                 nn.Linear(hidden, 16), nn.Dropout(0.0))
        self.grounding_encoder.requires_grad_(False)
        self.grounding_encoder.sam2_model.sam_mask_decoder.requires_grad_(True)
        self.mllm.manual_prepare_llm_for_lora()

    def state_dict(self, *args, **kwargs):
        """Only the trainable parts, as v2 saves them (LoRA and modules_to_save, the mask decoder, the fcs)."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        return OrderedDict((k, v) for k, v in full.items() if k in trainable)

    def forward(self, pixel_values, input_ids, masks=None, mode: str = "loss"):
        hidden, logits = self.mllm.hidden_and_logits(pixel_values, input_ids)
        if mode != "loss":
            return logits
        lm = logits[:, :-1]
        loss_lm = F.cross_entropy(lm.reshape(-1, lm.shape[-1]), input_ids[:, 1:].reshape(-1))
        seg = hidden[torch.arange(input_ids.shape[0]), (input_ids == self.seg_token_idx).int().argmax(1)]
        mask_logits = self.grounding_encoder.sam2_model.mask_logits(pixel_values, self.text_hidden_fcs(seg))
        return {"loss_lm": loss_lm, "loss_mask": F.binary_cross_entropy_with_logits(mask_logits, masks)}


@DATASETS.register_module()
class V2SegDataset(SeededSamples):
    """Image + text ending in ``[SEG]`` + a 4x4 mask."""

    def __init__(self, length: int = 16, seq_len: int = 8, seed: int = 0) -> None:
        super().__init__(length, seq_len, seed)

    def __getitem__(self, idx: int) -> dict:
        g = self.generator(idx)
        ids = torch.randint(4, 4 + N_WORDS, (self.seq_len,), generator=g)
        ids[-1] = 4 + N_WORDS  # [SEG], the first token added
        return {"pixel_values": torch.randn(3, 16, 16, generator=g), "input_ids": ids,
                "masks": (torch.rand(4, 4, generator=g) > 0.5).float()}
