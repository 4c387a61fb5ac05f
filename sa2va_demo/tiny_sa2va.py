"""A tiny model with Sa2VA's shape, for the demo and the tests (Sa2VA is not a pip package).

What it copies from Sa2VA, because each is a way trained weights get lost:
- ``mllm.model.{vision_model,mlp1,language_model}`` loaded from a base HF directory, with the
  LLM wrapped in PEFT LoRA, ``modules_to_save=["embed_tokens","lm_head"]`` and an added
  ``[SEG]`` token (so the embeddings are resized);
- a SAM2-like ``grounding_encoder`` whose mask decoder is trainable and the rest frozen, with
  a memory-encoder layer scale named ``gamma``;
- a trainable ``text_hidden_fcs`` head;
- a ``state_dict`` override that saves only the trainable parts;
- ``pretrained_pth`` loading in ``__init__``.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch import nn
from torch.utils.data import Dataset

from sa2va_hooks.converters.base import CONVERTERS
from sa2va_hooks.converters.sa2va import Sa2VAConverter
from .hf_code.configuration_tiny_sa2va import TinySa2VAConfig
from .hf_code.modeling_tiny_sa2va import (TinyGroundingEncoder, TinyInternVLChatModel, build_text_hidden_fcs,
                                          multimodal_logits)

HF_CODE_DIR = Path(__file__).parent / "hf_code"
TINY_AUTO_MAP = {"AutoConfig": "configuration_tiny_sa2va.TinySa2VAConfig",
                 "AutoModel": "modeling_tiny_sa2va.TinySa2VAChatModel",
                 "AutoModelForCausalLM": "modeling_tiny_sa2va.TinySa2VAChatModel"}
SAM2_FILE = "sam2_tiny.pth"
SEG_TOKEN = "[SEG]"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainLayerScale(nn.Module):
    """SAM2's layer scale as the training code names it: ``gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def scale(self) -> torch.Tensor:
        return self.gamma


def _tiny_tokenizer(n_words: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_config(vocab_size: int, tie_word_embeddings: bool = False) -> TinySa2VAConfig:
    return TinySa2VAConfig(
        vision_config={"hidden_size": 24, "patch_size": 4, "image_size": 16},
        llm_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                        tie_word_embeddings=tie_word_embeddings),
        mask_dim=16, sam_dim=16, template="tiny_chat", architectures=["TinyInternVLChatModel"])


def make_tiny_base(base_dir: str | Path, seed: int = 1234, tie_word_embeddings: bool = False) -> Path:
    """Write the frozen starting point of every demo run: an InternVL-like HF directory (config,
    weights, tokenizer) and a SAM2-like checkpoint. Idempotent; never touches the global RNG."""
    base_dir = Path(base_dir)
    if (base_dir / "config.json").is_file() and (base_dir / SAM2_FILE).is_file():
        return base_dir
    base_dir.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer(60)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mllm = TinyInternVLChatModel(tiny_config(len(tok), tie_word_embeddings))
        sam2 = TinyGroundingEncoder(16, 4, layer_scale_cls=TrainLayerScale)
        with torch.no_grad():
            for p in sam2.parameters():
                p.normal_(0.0, 0.2)
    mllm.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    torch.save(sam2.state_dict(), base_dir / SAM2_FILE)
    return base_dir


class TinyMLLM(nn.Module):
    """Holds ``.model`` like Sa2VA's InternVL wrapper does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _strict_load(module: nn.Module, state: dict, what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what} does not fit the model: missing {result.missing_keys[:20]}, "
                         f"unexpected {result.unexpected_keys[:20]}")


@MODELS.register_module()
class TinySa2VA(BaseModel):
    def __init__(self, base_dir: str, lora_r: int = 8, lora_alpha: int = 16, pretrained_pth: str | None = None,
                 template: str = "tiny_chat", data_preprocessor: dict | None = None,
                 modules_to_save: list[str] | None = ("embed_tokens", "lm_head")) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer
        base_dir = Path(base_dir)
        self.template = template
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        self.tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
        self.seg_token_id = self.tokenizer.convert_tokens_to_ids(SEG_TOKEN)

        self.mllm = TinyMLLM(TinyInternVLChatModel.from_pretrained(str(base_dir)))
        self.mllm.model.requires_grad_(False)
        llm = self.mllm.model.language_model
        llm.resize_token_embeddings(len(self.tokenizer))
        self.mllm.model.language_model = get_peft_model(llm, LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
            modules_to_save=list(modules_to_save) if modules_to_save else None, task_type="CAUSAL_LM"))

        cfg = self.mllm.model.config
        self.grounding_encoder = TinyGroundingEncoder(cfg.sam_dim, cfg.vision_config["patch_size"],
                                                      layer_scale_cls=TrainLayerScale)
        _strict_load(self.grounding_encoder, torch.load(base_dir / SAM2_FILE, weights_only=True),
                     str(base_dir / SAM2_FILE))
        self.grounding_encoder.requires_grad_(False)
        self.grounding_encoder.sam2_model.sam_mask_decoder.requires_grad_(True)
        self.text_hidden_fcs = build_text_hidden_fcs(llm.config.hidden_size, cfg.sam_dim)

        if pretrained_pth:
            self._load_pretrained(pretrained_pth)

    def _load_pretrained(self, path: str) -> None:
        """As Sa2VA does it, flaws included (this model is a stand-in for Sa2VA's behaviour): keep
        the keys the model has with the same shape, print how many were skipped for shape, drop
        the rest without counting, and load with strict=False. tools/export.py's independent
        pretrained_pth report exists because of this."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        own = torch.nn.Module.state_dict(self)
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = [k for k in state if k in own and own[k].shape != state[k].shape]
        self.load_state_dict(fitting, strict=False)
        print(f"[TinySa2VA] loaded pretrained_pth {path}; {len(skipped)} key(s) skipped for shape")

    def state_dict(self, *args, **kwargs):
        """Only the trainable parts, as Sa2VA saves them."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        return OrderedDict((k, v) for k, v in full.items() if k in trainable)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, masks: torch.Tensor | None = None,
                mode: str = "loss"):
        m = self.mllm.model
        out, n_img = multimodal_logits(m.vision_model, m.mlp1, m.language_model, pixel_values, input_ids,
                                       output_hidden_states=True)
        if mode != "loss":
            return out.logits
        text_logits = out.logits[:, n_img:-1]
        loss_lm = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        seg_pos = (input_ids == self.seg_token_id).int().argmax(dim=1) + n_img
        seg_hidden = out.hidden_states[-1][torch.arange(input_ids.shape[0]), seg_pos]
        query = self.text_hidden_fcs(seg_hidden)
        mask_logits = self.grounding_encoder.sam2_model.mask_logits(pixel_values, query)
        loss_mask = F.binary_cross_entropy_with_logits(mask_logits, masks)
        return {"loss_lm": loss_lm, "loss_mask": loss_mask}


class SeededSamples(Dataset):
    """Synthetic samples that depend only on (seed, index): the same seed gives the same data set
    in every run and after resume, another seed another data set."""

    def __init__(self, length: int, seq_len: int, seed: int) -> None:
        self.length, self.seq_len, self.seed = length, seq_len, seed

    def __len__(self) -> int:
        return self.length

    def generator(self, idx: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + idx)


@DATASETS.register_module()
class TinySegDataset(SeededSamples):
    """Synthetic image + text + mask samples; ``seed`` selects a different data set."""

    def __init__(self, base_dir: str, length: int = 32, seed: int = 0, seq_len: int = 8) -> None:
        from transformers import AutoTokenizer
        super().__init__(length, seq_len, seed)
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
        self.image_size = cfg["vision_config"]["image_size"]
        self.mask_side = self.image_size // cfg["vision_config"]["patch_size"]
        tok = AutoTokenizer.from_pretrained(str(base_dir))
        self.n_words = len(tok)
        self.seg_id = len(tok)  # the token the model adds

    def __getitem__(self, idx: int) -> dict:
        g = self.generator(idx)
        ids = torch.randint(4, self.n_words, (self.seq_len,), generator=g)
        ids[-1] = self.seg_id
        return {"pixel_values": torch.randn(3, self.image_size, self.image_size, generator=g),
                "input_ids": ids,
                "masks": (torch.rand(self.mask_side, self.mask_side, generator=g) > 0.5).float()}


@CONVERTERS.register_module(name="tiny_sa2va")
class TinySa2VAConverter(Sa2VAConverter):
    """The sa2va converter with the tiny model's remote code and class names as defaults."""

    name = "tiny_sa2va"
    priority = -100  # below every real converter: chosen by name (configs, tests), never by "auto"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("hf_code_dir", str(HF_CODE_DIR))
        kwargs.setdefault("auto_map", TINY_AUTO_MAP)
        kwargs.setdefault("architectures", ["TinySa2VAChatModel"])
        super().__init__(**kwargs)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(getattr(model, "mllm", None), "model", None)
        return isinstance(inner, TinyInternVLChatModel) and super().matches(model)
