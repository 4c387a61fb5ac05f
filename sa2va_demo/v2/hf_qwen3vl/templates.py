"""Prompt templates, as Sa2VA's HF code's ``templates.PROMPT_TEMPLATE`` (the names its configs use)."""

PROMPT_TEMPLATE = dict(
    internlm2_chat=dict(SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
                        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                        SUFFIX="<|im_end|>", SEP="\n", STOP_WORDS=["<|im_end|>"]),
    qwen_chat=dict(SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
                   INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                   SUFFIX="<|im_end|>", SEP="\n", STOP_WORDS=["<|im_end|>", "<|endoftext|>"]),
    phi3_chat=dict(SYSTEM="<|system|>\n{system}<|end|>\n", INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n",
                   SUFFIX="<|end|>", SEP="\n", STOP_WORDS=["<|end|>"]),
)
