"""Tiny members of the other families, built from configs with random weights, for the demo
configs under configs/ and the tests: xtuner's real ``LLaVAModel`` and a Sa2VA model with a
Qwen-VL-style mllm. Each factory makes its base directories on first use."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch import nn
from .tiny_sa2va import SeededSamples, TinyMLLM, TrainLayerScale, _tiny_tokenizer

IMAGE_TOKEN_INDEX = -200  # xtuner's placeholder for image features in input_ids


def make_llm_dir(path: str | Path, *, extra_tokens: tuple[str, ...] = (), seed: int = 3) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = _tiny_tokenizer(58)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens), special_tokens=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                             max_position_embeddings=64, tie_word_embeddings=False))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_clip_dir(path: str | Path, seed: int = 4) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=16, patch_size=8,
                                                 projection_dim=16))
    model.save_pretrained(str(path))
    return path


def tiny_xtuner_llava(root: str = "work_dirs/tiny_llava", llm_lora_r: int = 4) -> nn.Module:
    """xtuner's own LLaVAModel over a tiny Qwen2 (with an <image> token) and a tiny CLIP tower."""
    from mmengine.config import ConfigDict
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model import LLaVAModel

    from sa2va_hooks.compat import apply_torch_cpu_bf16_shim
    apply_torch_cpu_bf16_shim()
    llm_dir = make_llm_dir(Path(root) / "llm", extra_tokens=("<image>",))
    clip_dir = make_clip_dir(Path(root) / "clip")
    return LLaVAModel(
        llm=ConfigDict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(llm_dir),
                       torch_dtype=torch.float32),
        visual_encoder=ConfigDict(type=CLIPVisionModel.from_pretrained, pretrained_model_name_or_path=str(clip_dir)),
        freeze_llm=True, freeze_visual_encoder=True, use_activation_checkpointing=False,
        llm_lora=ConfigDict(type=LoraConfig, r=llm_lora_r, lora_alpha=2 * llm_lora_r, lora_dropout=0.0,
                            task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"]))


class TinyLLaVADataset(SeededSamples):
    """xtuner LLaVA samples: one image placeholder, text, labels and a 16x16 image."""

    def __init__(self, length: int = 16, seq_len: int = 8, seed: int = 0) -> None:
        super().__init__(length, seq_len, seed)

    def __getitem__(self, idx: int) -> dict:
        g = self.generator(idx)
        ids = torch.randint(4, 62, (self.seq_len,), generator=g).tolist()
        return {"input_ids": [IMAGE_TOKEN_INDEX] + ids, "labels": [-100] + ids,
                "pixel_values": torch.randn(3, 16, 16, generator=g)}


IMG_CONTEXT = "<IMG_CONTEXT>"


def make_internvl_dir(path: str | Path, seed: int = 5) -> Path:
    """An InternVL-style chat model directory: config with auto_map, remote code, weights, tokenizer."""
    import shutil

    from .internvl_code.configuration_tiny_internvl import TinyInternVLConfig
    from .internvl_code.modeling_tiny_internvl import TinyInternVLChatModel
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = _tiny_tokenizer(58)
    tok.add_tokens([IMG_CONTEXT], special_tokens=True)
    cfg = TinyInternVLConfig(llm_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                             max_position_embeddings=64, tie_word_embeddings=False),
                             auto_map={"AutoConfig": "configuration_tiny_internvl.TinyInternVLConfig",
                                       "AutoModel": "modeling_tiny_internvl.TinyInternVLChatModel"},
                             architectures=["TinyInternVLChatModel"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyInternVLChatModel(cfg)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    for f in (Path(__file__).parent / "internvl_code").glob("*_tiny_internvl.py"):
        shutil.copy2(f, path / f.name)
    return path


def _ensure_process_group() -> None:
    """xtuner's InternVL_V1_5.forward calls torch.distributed.get_rank(), which needs a process
    group even in a one-process CPU run (mmengine's pytorch launcher needs CUDA); start a
    one-process gloo group when none exists. Demo-only convenience."""
    import os

    import torch.distributed as dist
    if dist.is_available() and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)


def tiny_xtuner_internvl(root: str = "work_dirs/tiny_internvl", llm_lora_r: int = 4) -> nn.Module:
    """xtuner's own InternVL_V1_5 over a tiny InternVL-style remote-code model; LoRA on the LLM,
    the mlp1 projector trained, the vision tower frozen."""
    from mmengine.config import ConfigDict
    from peft import LoraConfig
    from xtuner.model import InternVL_V1_5

    from sa2va_hooks.compat import apply_torch_cpu_bf16_shim
    apply_torch_cpu_bf16_shim()
    _ensure_process_group()
    path = make_internvl_dir(Path(root) / "internvl")
    model = InternVL_V1_5(model_path=str(path), freeze_llm=True, freeze_visual_encoder=True,
                          llm_lora=ConfigDict(type=LoraConfig, r=llm_lora_r, lora_alpha=2 * llm_lora_r,
                                              lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"]))
    return model.float()  # InternVL_V1_5 loads in bf16; the tiny CPU demo trains in fp32


class TinyInternVLDataset(SeededSamples):
    """InternVL samples: 16 image-context tokens (one 16x16 image, 4x4 patches), then text."""

    def __init__(self, root: str = "work_dirs/tiny_internvl", length: int = 16, seq_len: int = 8,
                 seed: int = 0) -> None:
        from transformers import AutoTokenizer
        super().__init__(length, seq_len, seed)
        self.img_context = AutoTokenizer.from_pretrained(str(make_internvl_dir(Path(root) / "internvl"))) \
            .convert_tokens_to_ids(IMG_CONTEXT)

    def __getitem__(self, idx: int) -> dict:
        g = self.generator(idx)
        ids = torch.randint(4, 62, (self.seq_len,), generator=g).tolist()
        return {"input_ids": [self.img_context] * 16 + ids, "labels": [-100] * 16 + ids,
                "pixel_values": torch.randn(1, 3, 16, 16, generator=g)}


def qwen_vl_config(vocab_size: int):
    from .hf_code_qwen.configuration_tiny_sa2va_qwen import TinySa2VAQwenConfig
    return TinySa2VAQwenConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=64, template="qwen2_vl_chat",
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, image_token_id=2, video_token_id=2,
        vision_start_token_id=3)


class TinySa2VAQwen(BaseModel):
    """Sa2VA's shape with a Qwen-VL-style mllm: ``mllm.model`` is a Qwen2-VL model with LoRA on its
    language layers and a trained lm_head; a SAM2-like grounding encoder (``gamma`` layer scale,
    trainable mask decoder) and ``text_hidden_fcs``."""

    def __init__(self, seed: int = 8, data_preprocessor: dict | None = None) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen2VLForConditionalGeneration

        from .hf_code.modeling_tiny_sa2va import TinyGroundingEncoder, build_text_hidden_fcs
        super().__init__(data_preprocessor=data_preprocessor)
        tok = _tiny_tokenizer(60)
        tok.add_tokens(["[SEG]"], special_tokens=True)
        self.tokenizer, self.template = tok, "qwen2_vl_chat"
        self.seg_token_id = tok.convert_tokens_to_ids("[SEG]")
        with torch.random.fork_rng(devices=[]):  # the frozen base is the same in every run
            torch.manual_seed(seed)
            qwen = Qwen2VLForConditionalGeneration(qwen_vl_config(len(tok)))
            self.grounding_encoder = TinyGroundingEncoder(16, 4, layer_scale_cls=TrainLayerScale)
        qwen.requires_grad_(False)
        self.mllm = TinyMLLM(get_peft_model(qwen, LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=["lm_head"],
            target_modules=r".*model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")))
        self.grounding_encoder.requires_grad_(False)
        self.grounding_encoder.sam2_model.sam_mask_decoder.requires_grad_(True)
        self.text_hidden_fcs = build_text_hidden_fcs(32, 16)

    def forward(self, pixel_values, input_ids, masks=None, mode: str = "loss"):
        out = self.mllm.model(input_ids=input_ids, output_hidden_states=True)
        if mode != "loss":
            return out.logits
        logits = out.logits[:, :-1]
        loss_lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        seg = out.hidden_states[-1][torch.arange(input_ids.shape[0]), (input_ids == self.seg_token_id).int().argmax(1)]
        mask_logits = self.grounding_encoder.sam2_model.mask_logits(pixel_values, self.text_hidden_fcs(seg))
        return {"loss_lm": loss_lm, "loss_mask": F.binary_cross_entropy_with_logits(mask_logits, masks)}


class TinyQwenSegDataset(SeededSamples):
    def __init__(self, length: int = 16, seq_len: int = 8, seed: int = 0) -> None:
        super().__init__(length, seq_len, seed)

    def __getitem__(self, idx: int) -> dict:
        g = self.generator(idx)
        ids = torch.randint(4, 64, (self.seq_len,), generator=g)
        ids[-1] = 64  # [SEG]
        return {"pixel_values": torch.randn(3, 16, 16, generator=g), "input_ids": ids,
                "masks": (torch.rand(4, 4, generator=g) > 0.5).float()}


def _register() -> None:
    from sa2va_hooks.converters.base import CONVERTERS
    from sa2va_hooks.converters.sa2va import Sa2VAQwenConverter

    @CONVERTERS.register_module(name="tiny_sa2va_qwen", force=True)
    class TinySa2VAQwenConverter(Sa2VAQwenConverter):
        """sa2va_qwen with the tiny model's remote code, class names and image processor."""

        name = "tiny_sa2va_qwen"
        priority = -100  # below every real converter: chosen by name (configs, tests), never by "auto"

        def __init__(self, **kwargs) -> None:
            from transformers import Qwen2VLImageProcessor
            kwargs.setdefault("hf_code_dir", str(Path(__file__).parent / "hf_code_qwen"))
            kwargs.setdefault("auto_map", {"AutoConfig": "configuration_tiny_sa2va_qwen.TinySa2VAQwenConfig",
                                           "AutoModel": "modeling_tiny_sa2va_qwen.TinySa2VAQwenChatModel"})
            kwargs.setdefault("architectures", ["TinySa2VAQwenChatModel"])
            kwargs.setdefault("processor", Qwen2VLImageProcessor())
            super().__init__(**kwargs)

        @classmethod
        def matches(cls, model: nn.Module) -> bool:
            return isinstance(model, TinySa2VAQwen)


_register()
