"""Everything a try-out of univ needs without the Hugging Face Hub: a generated corpus, a tokenizer
trained on it, and two models with random weights, saved as local folders that share the
tokenizer: Pythia-14M's architecture and a Mamba of the same size (d_model 128, 6 layers), or with
--real the study's Pythia-160M and Mamba-130M (univ's shipped configs; embeddings sized to the
tokenizer).

    python -m univ.tryout DIR [--real]

Random weights give meaningless numbers: this shows what univ does and how long it takes, not
what the study finds.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from .architectures import CONFIGS

PAIR = ("pythia-160m", "mamba-130m")
"""The study's pair (--real)."""
SMALL = {"pythia-14m": CONFIGS["pythia-14m"],
         "mamba-14m": {**CONFIGS["mamba-130m"], "hidden_size": 128, "num_hidden_layers": 6, "time_step_rank": 8}}
"""Pythia-14M and a Mamba of its width and depth (not a published model): the default, minutes on a CPU."""


def corpus_and_tokenizer(root: Path, n_docs: int = 3000, words: tuple[int, int] = (50, 400), vocab_size: int = 2000,
                         seed: int = 0):
    """root/corpus.txt (documents of random words, separated by blank lines) and a byte-level BPE
    tokenizer trained on it, with GPT-NeoX's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(lexicon) for _ in range(rng.randint(*words))) for _ in range(n_docs)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size,
                                                      special_tokens=["<|endoftext|>", "<|padding|>"]))
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|padding|>")


def random_model(architecture: str | dict, tokenizer, out: Path, seed: int = 0) -> Path:
    """An architecture (an alias, or config.json fields) with random weights and embeddings for
    ``tokenizer``, saved at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    vocab = -(-len(tokenizer) // 8) * 8  # padded to a multiple of 8, as the checkpoints are
    fields = CONFIGS[architecture] if isinstance(architecture, str) else architecture
    config = AutoConfig.for_model(**{**fields, "vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    real = "--real" in args
    rest = [a for a in args if a != "--real"]
    if len(rest) != 1 or rest[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    root = Path(rest[0])
    tokenizer = corpus_and_tokenizer(root)
    pair = {alias: alias for alias in PAIR} if real else SMALL
    a, b = (random_model(arch, tokenizer, root / f"{name}-random", seed)
            for seed, (name, arch) in enumerate(pair.items()))
    print(f"wrote {root / 'corpus.txt'}, {a} and {b}; now run:\n"
          f"HF_HUB_OFFLINE=1 univ all --model-a {a} --model-b {b} --dataset {root / 'corpus.txt'} "
          f"--preset smoke --cache-dir {root / 'cache'}")


if __name__ == "__main__":
    main()
