"""The architectures of the aliased models, shipped with univ so that `random:ALIAS` and the
offline try-out need no Hub: config.json fields as the checkpoints publish them (the fields that
decide the architecture; everything else keeps transformers' defaults)."""

from __future__ import annotations

import math

# Pythia (GPT-NeoX): d_model, layers, heads, MLP width, embedding rows.
_PYTHIA = {
    "14m": (128, 6, 4, 512, 50304), "31m": (256, 6, 8, 1024, 50304), "70m": (512, 6, 8, 2048, 50304),
    "160m": (768, 12, 12, 3072, 50304), "410m": (1024, 24, 16, 4096, 50304), "1b": (2048, 16, 8, 8192, 50304),
    "1.4b": (2048, 24, 16, 8192, 50304), "2.8b": (2560, 32, 32, 10240, 50304),
    "6.9b": (4096, 32, 32, 16384, 50432), "12b": (5120, 36, 40, 20480, 50688),
}
# Mamba (the -hf conversions): d_model, layers.
_MAMBA = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
# RWKV-4 trained on the Pile: d_model, layers.
_RWKV = {"169m": (768, 12), "430m": (1024, 24), "1b5": (2048, 24), "3b": (2560, 32)}


def _pythia(d: int, layers: int, heads: int, mlp: int, vocab: int) -> dict:
    return {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": d,
            "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": mlp, "vocab_size": vocab,
            "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "use_parallel_residual": True, "tie_word_embeddings": False,
            "bos_token_id": 0, "eos_token_id": 0}


def _mamba(d: int, layers: int) -> dict:
    return {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": d, "num_hidden_layers": layers,
            "vocab_size": 50280, "state_size": 16, "expand": 2, "conv_kernel": 4, "time_step_rank": math.ceil(d / 16),
            "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "use_bias": False, "use_conv_bias": True,
            "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def _rwkv(d: int, layers: int) -> dict:
    return {"model_type": "rwkv", "architectures": ["RwkvForCausalLM"], "hidden_size": d, "num_hidden_layers": layers,
            "attention_hidden_size": d, "intermediate_size": 4 * d, "vocab_size": 50277, "context_length": 1024,
            "layer_norm_epsilon": 1e-5, "rescale_every": 6, "tie_word_embeddings": False,
            "bos_token_id": 0, "eos_token_id": 0}


CONFIGS: dict[str, dict] = {
    **{f"pythia-{s}": _pythia(*v) for s, v in _PYTHIA.items()},
    **{f"pythia-{s}-deduped": _pythia(*v) for s, v in _PYTHIA.items()},
    **{f"pythia-160m-seed{n}": _pythia(*_PYTHIA["160m"]) for n in range(1, 10)},
    **{f"mamba-{s}": _mamba(*v) for s, v in _MAMBA.items()},
    **{f"rwkv-{s}": _rwkv(*v) for s, v in _RWKV.items()},
}
"""Alias -> its checkpoint's architecture (config.json fields)."""
