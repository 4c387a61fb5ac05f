# xtuner's LLaVAModel (tiny Qwen2 + tiny CLIP, LoRA on the LLM, trained projector) with the hooks;
# exports load as transformers' LlavaForConditionalGeneration. Run from any directory:
#   python tools/train.py configs/xtuner_tiny_llava.py --work-dir W
# The tiny base directories are made under work_dirs/tiny_llava on first use.
from mmengine.config import read_base
from mmengine.dataset import DefaultSampler
from transformers import AutoTokenizer
from xtuner.dataset.collate_fns import default_collate_fn

from sa2va_hooks import FingerprintHook, HFExportHook
from sa2va_demo.families import TinyLLaVADataset, tiny_xtuner_llava

with read_base():
    from ._base_.tiny_runtime import *  # noqa: F401,F403

root = "work_dirs/tiny_llava"
model = dict(type=tiny_xtuner_llava, root=root)
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(type=TinyLLaVADataset, length=16, seed=0),
                        sampler=dict(type=DefaultSampler, shuffle=True), collate_fn=dict(type=default_collate_fn))
custom_hooks = [
    dict(type=FingerprintHook),
    dict(type=HFExportHook, dtype="bf16",
         tokenizer=dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=root + "/llm")),
]
