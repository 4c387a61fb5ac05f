"""Prompt templates the tiny Sa2VA model knows, looked up by ``config.template`` as Sa2VA's own
``templates.PROMPT_TEMPLATE`` is ('-' read as '_')."""

PROMPT_TEMPLATE = dict(
    tiny_chat=dict(SYSTEM="<s>{system}\n", INSTRUCTION="user: {input}\nassistant: ", SEP="\n"),
    internlm2_chat=dict(SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
                        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                        SUFFIX="<|im_end|>", SEP="\n"),
    qwen_chat=dict(SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
                   INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                   SUFFIX="<|im_end|>", SEP="\n"),
)
