"""Tiny models of both families, a tokenizer trained on the spot, and a small corpus.

Nothing here touches the Hugging Face Hub: the models are built from configs and saved with
save_pretrained, the way a user's own checkpoint folder would look.
"""

import json
import os
import random
import shutil

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
# Without CUDA, univ's Triton kernels run in Triton's interpreter, so CPU runs check them too
# (test_triton_interpreted.py). Set before univ.scan imports Triton: jit reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# transformers' MambaConfig of Mamba-130M (random weights stand in for the checkpoint).
MAMBA_130M = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4,
                  time_step_rank=48)
VOCAB = 384  # embedding rows; a multiple of 8 as mamba-ssm pads it
WORDS = ("the cat dog sat ran on a mat and then saw bird tree house red blue green small big "
         "quick lazy fox jumps over under river stone cloud light dark night day sun moon").split()


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = rng.randint(3, 40)
        docs.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|padding|>")


def build_neox(path, tokenizer, layers=2, seed=0, max_positions=64):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=max_positions, rotary_pct=0.25,
                        bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_mamba(path, tokenizer, layers=3, seed=0):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, state_size=4,
                      expand=2, conv_kernel=4, time_step_rank=2, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    MambaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_rwkv(path, tokenizer, layers=3, seed=0, rescale_every=2):
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(seed)
    cfg = RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, attention_hidden_size=32,
                     intermediate_size=128, context_length=64, rescale_every=rescale_every, bos_token_id=0,
                     eos_token_id=0)
    model = RwkvForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises the decays to constants; make channels differ
        for block in model.rwkv.blocks:
            block.attention.time_decay.normal_(0, 1)
            block.attention.time_first.normal_(0, 1)
            for p in (block.attention.time_mix_key, block.attention.time_mix_value,
                      block.attention.time_mix_receptance, block.feed_forward.time_mix_key,
                      block.feed_forward.time_mix_receptance):
                p.uniform_(0, 1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_mamba_ssm(path, hf_dir, with_tokenizer=True):
    """The same weights as hf_dir, laid out as an original mamba-ssm checkpoint."""
    from safetensors.torch import load_file

    path.mkdir(parents=True)
    state = load_file(hf_dir / "model.safetensors")
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state.items()}
    state.setdefault("lm_head.weight", state["backbone.embedding.weight"])
    torch.save(state, path / "pytorch_model.bin")
    hf = json.loads((hf_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({
        "d_model": hf["hidden_size"], "n_layer": hf["num_hidden_layers"], "vocab_size": VOCAB - 5,
        "ssm_cfg": {"d_state": hf["state_size"], "dt_rank": hf["time_step_rank"]},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    }))
    if with_tokenizer:
        for f in hf_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    docs = make_corpus(120)
    tokenizer = train_tokenizer(docs)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    big_corpus = root / "big-corpus.txt"  # room for an MPPC window, held-out rows and a training stream
    big_corpus.write_text("\n\n".join(make_corpus(2000, seed=1)) + "\n")
    neox = build_neox(root / "tiny-neox", tokenizer)
    mamba = build_mamba(root / "tiny-mamba", tokenizer)
    other_tok = train_tokenizer(make_corpus(50, seed=9), vocab_size=280)
    neox_other = build_neox(root / "tiny-neox-othertok", other_tok)
    return {"root": root, "corpus": corpus, "big_corpus": big_corpus, "docs": docs, "tokenizer": tokenizer,
            "neox": neox, "mamba": mamba, "neox_other": neox_other}
