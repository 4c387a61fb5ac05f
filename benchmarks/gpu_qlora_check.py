"""QLoRA on a GPU through transformers' real bitsandbytes path (BitsAndBytesConfig), which does not
run on the CPU machine: load a tiny Qwen2 in 4-bit (nf4) and 8-bit, wrap with PEFT LoRA (PEFT picks
its bnb LoRA layers), give the adapters values, export with sa2va_hooks, and compare every tensor
bit for bit with PEFT's merge_and_unload() on an fp32 twin holding the dequantized base values and
the same adapter weights; then reload the export and compare logits with the QLoRA model.
Env: BENCH_OUT for the JSON lines."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
OUT = Path(os.environ.get("BENCH_OUT") or os.environ.get("OUT") or "/tmp/bench_out")
OUT.mkdir(parents=True, exist_ok=True)


def log(**kw) -> None:
    line = json.dumps(kw)
    print(line, flush=True)
    with open(OUT / "gpu_qlora_check.jsonl", "a") as f:
        f.write(line + "\n")


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    from sa2va_hooks import export_hf
    from sa2va_hooks.core.merge import dequantized_weight, quantization_of
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)).save_pretrained(
        work / "base")
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    for bits in (4, 8):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32) \
            if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
        qm = AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=q, device_map={"": 0},
                                                  torch_dtype=torch.float32)
        pm = get_peft_model(qm, LoraConfig(**lora))
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.05)
        before = {n: (p.detach().clone(), p._version) for n, p in pm.named_parameters()}
        m = export_hf(pm, work / f"out{bits}", dtype="bf16")
        unchanged = all(torch.equal(p.detach(), before[n][0]) and p._version == before[n][1]
                        for n, p in pm.named_parameters())

        twin = AutoModelForCausalLM.from_pretrained(work / "base", torch_dtype=torch.float32).cuda()
        qmods = dict(qm.named_modules())
        with torch.no_grad():
            for name, mod in twin.named_modules():
                src = qmods.get(name)
                src = src.get_base_layer() if hasattr(src, "get_base_layer") else src
                if isinstance(mod, torch.nn.Linear) and src is not None and quantization_of(src.weight):
                    mod.weight.copy_(dequantized_weight(src))
        tpm = get_peft_model(twin, LoraConfig(**lora))
        res = tpm.load_state_dict({k: v for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)
        ref = {k: v.to(torch.bfloat16).cpu() for k, v in tpm.merge_and_unload().state_dict().items()}
        got = load_file(work / f"out{bits}" / "model.safetensors")
        mismatched = [k for k in ref if k not in got or not torch.equal(ref[k], got[k])]
        reloaded, info = AutoModelForCausalLM.from_pretrained(work / f"out{bits}", torch_dtype=torch.float32,
                                                              output_loading_info=True)
        ids = torch.randint(0, 512, (2, 16), generator=g)
        with torch.no_grad():
            want = pm.eval()(input_ids=ids.cuda()).logits.float().cpu()
            have = reloaded.eval()(input_ids=ids).logits
        rel = float(torch.linalg.vector_norm(have - want) / torch.linalg.vector_norm(want))
        log(bits=bits, peft_layer=f"{type(layer).__module__}.{type(layer).__name__}", tensors=len(got),
            bitwise_mismatches=len(mismatched), examples=mismatched[:3], live_unchanged=unchanged,
            unexpected_lora_keys=len(res.unexpected_keys), missing=len(info["missing_keys"]),
            unexpected=len(info["unexpected_keys"]), logits_rel_err=rel, notes=m.notes,
            config_has_quantization=("quantization_config" in json.loads(
                (work / f"out{bits}" / "config.json").read_text())))


if __name__ == "__main__":
    main()
