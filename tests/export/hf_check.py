"""Runs in the transformers 5 side environment (see side_env.py); imports nothing of ours.

    python tests/export/hf_check.py spec.json

spec.json: {"cases": [{"dir": export dir, "tokens": [[ids]], "prompt_len": n, "new_tokens": k,
"text": str, "out": logits.safetensors}]}. For each case: AutoModelForCausalLM.from_pretrained (no
remote code) in float32, the logits of `tokens` (saved to `out`), greedy `generate` of `new_tokens`
after the first row's first `prompt_len` tokens, and AutoTokenizer's ids for `text`. Prints one JSON
line per case.
"""
import json
import sys
import time

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    torch.manual_seed(0)
    for case in spec["cases"]:
        t0 = time.perf_counter()
        model, info = AutoModelForCausalLM.from_pretrained(
            case["dir"], dtype=torch.float32, trust_remote_code=False, output_loading_info=True)
        model.eval()
        tokens = torch.tensor(case["tokens"], dtype=torch.long)
        with torch.no_grad():
            logits = model(tokens).logits.float().contiguous()
        save_file({"logits": logits}, case["out"])
        prompt = tokens[:1, : case["prompt_len"]]
        with torch.no_grad():
            generated = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                       max_new_tokens=case["new_tokens"], do_sample=False)
        tok = AutoTokenizer.from_pretrained(case["dir"])
        print(json.dumps({
            "dir": case["dir"], "transformers": transformers.__version__, "class": type(model).__name__,
            "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
            "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
            "generated": generated[0, case["prompt_len"]:].tolist(),
            "text_ids": tok(case["text"], add_special_tokens=False)["input_ids"],
            "decoded": tok.decode(tok(case["text"], add_special_tokens=False)["input_ids"]),
            "eos_token_id": tok.eos_token_id, "seconds": round(time.perf_counter() - t0, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
