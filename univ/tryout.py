"""Everything a try-out of univ needs without the Hugging Face Hub: a generated corpus, a tokenizer
trained on it, and two models with the real architectures of Pythia-160M and Mamba-130M (univ's
shipped configs, embeddings sized to that tokenizer) and random weights, saved as local folders.

    python -m univ.tryout DIR

Random weights give meaningless numbers: this shows what univ does and how long it takes, not
what the study finds.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from .architectures import CONFIGS

PAIR = ("pythia-160m", "mamba-130m")


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


def random_model(alias: str, tokenizer, out: Path, seed: int = 0) -> Path:
    """``alias``'s architecture with random weights and embeddings for ``tokenizer``, saved at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    vocab = -(-len(tokenizer) // 8) * 8  # padded to a multiple of 8, as the checkpoints are
    config = AutoConfig.for_model(**{**CONFIGS[alias], "vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    root = Path(args[0])
    tokenizer = corpus_and_tokenizer(root)
    a, b = (random_model(alias, tokenizer, root / f"{alias}-random", seed) for seed, alias in enumerate(PAIR))
    print(f"wrote {root / 'corpus.txt'}, {a} and {b}; now run:\n"
          f"HF_HUB_OFFLINE=1 univ all --model-a {a} --model-b {b} --dataset {root / 'corpus.txt'} "
          f"--preset smoke --cache-dir {root / 'cache'}")


if __name__ == "__main__":
    main()
