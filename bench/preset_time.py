"""Wall time of `univ all --preset P` on the real architectures (Pythia-160M, Mamba-130M) with
random weights, a tokenizer trained on the spot and a generated corpus: what a preset costs on
this machine when the Hub (and so the real checkpoints and OpenWebText) is out of reach.

    python bench/preset_time.py smoke
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from univ.tryout import PAIR, corpus_and_tokenizer, random_model  # noqa: E402


def main():
    preset = sys.argv[1] if len(sys.argv) > 1 else "smoke"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = corpus_and_tokenizer(root)
        a, b = (random_model(alias, tokenizer, root / f"{alias}-random", seed) for seed, alias in enumerate(PAIR))
        cmd = [sys.executable, "univ.py", "all", "--model-a", str(a), "--model-b", str(b), "--preset", preset,
               "--dataset", str(root / "corpus.txt"),
               "--cache-dir", str(root / "cache")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(done.stdout[-3000:])
        print(done.stderr[-1500:] if done.returncode else "")
        print(f"univ all --preset {preset}: exit {done.returncode}, {seconds:.0f} s wall")


if __name__ == "__main__":
    main()
