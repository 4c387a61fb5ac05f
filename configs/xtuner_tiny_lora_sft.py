# xtuner-style (lazy-import) config: a tiny Qwen2 trained with LoRA by xtuner's SupervisedFinetune,
# with both sa2va_hooks hooks. Run it through tools/train.py (it applies the CPU shim first):
#   SA2VA_TINY_LLM=work_dirs/tiny_llm python tools/train.py configs/xtuner_tiny_lora_sft.py --work-dir W
# The model directory (relative to the working directory) is made by
# sa2va_demo.tiny_llm.make_tiny_llm; tools/train.py does it when SA2VA_TINY_LLM is set.
import torch
from mmengine.config import read_base
from mmengine.dataset import DefaultSampler
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.model import SupervisedFinetune

from sa2va_hooks import FingerprintHook, HFExportHook
from sa2va_demo.tiny_llm import TinyTokenDataset

with read_base():
    from ._base_.tiny_runtime import *  # noqa: F401,F403

llm_dir = "work_dirs/tiny_llm"  # lazy configs cannot call functions such as os.environ.get

# 6 iterations, a checkpoint (and an export) every 3, instead of the shared 4 and 2
train_cfg.update(max_iters=6)  # noqa: F405
default_hooks.checkpoint.update(interval=3)  # noqa: F405

tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=llm_dir)
model = dict(
    type=SupervisedFinetune,
    use_activation_checkpointing=False,
    llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=llm_dir,
             torch_dtype=torch.float32),
    lora=dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

train_dataloader = dict(
    batch_size=2, num_workers=0,
    dataset=dict(type=TinyTokenDataset, length=32, seq_len=12, vocab_size=64, seed=0),
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn))
custom_hooks = [
    dict(type=FingerprintHook),
    dict(type=HFExportHook, dtype="bf16", tokenizer=tokenizer),
]
