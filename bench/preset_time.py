"""Wall time of `univ all --preset P` on the real architectures (Pythia-160M, Mamba-130M) with
random weights, a tokenizer trained on the spot and a generated corpus: what a preset costs on
this machine when the Hub (and so the real checkpoints and OpenWebText) is out of reach.

    python bench/preset_time.py smoke
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_mamba import mamba_130m, pythia_160m  # noqa: E402


def random_corpus(root: Path, n_docs: int = 3000, words: tuple[int, int] = (50, 400)):
    """A generated corpus (root/corpus.txt) and a tokenizer trained on it: what the benches run on
    when the Hub's corpora and tokenizers are out of reach."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(*words))) for _ in range(n_docs)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<|padding|>"]))
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|padding|>")


def main():
    preset = sys.argv[1] if len(sys.argv) > 1 else "smoke"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = random_corpus(root)
        for name, build in (("pythia-160m-random", pythia_160m), ("mamba-130m-random", mamba_130m)):
            build().save_pretrained(root / name)
            tokenizer.save_pretrained(root / name)
        cmd = [sys.executable, "univ.py", "all", "--model-a", str(root / "pythia-160m-random"),
               "--model-b", str(root / "mamba-130m-random"), "--preset", preset, "--dataset", str(root / "corpus.txt"),
               "--cache-dir", str(root / "cache")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(done.stdout[-3000:])
        print(done.stderr[-1500:] if done.returncode else "")
        print(f"univ all --preset {preset}: exit {done.returncode}, {seconds:.0f} s wall")


if __name__ == "__main__":
    main()
