"""Off-by-One, univ's default against the authors' notebook (--swap-decay), on one planted Mamba.

The planted model (random weights otherwise, built here): three layers of which only the middle
one writes to the residual stream; its causal conv passes on the previous position only, and its
state decays slowly. So B (at position 1) enters that layer's state at position 2, by
construction. Printed: the change of B's mean logit when the write at p is corrupted, p = 1..4,
with only the write swapped (the default) and with the decay swapped too, taken from p + 1 as the
notebook did.

    python bench/offbyone_planted.py
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from univ import models  # noqa: E402
from univ.circuit import CircuitConfig  # noqa: E402
from univ.offbyone import TABLE, run_offbyone  # noqa: E402


def planted(root: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    words = "the cat dog sat ran on a mat and then saw bird tree house red blue green".split()
    docs = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(200)]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|padding|>")
    torch.manual_seed(3)
    model = MambaForCausalLM(MambaConfig(vocab_size=384, hidden_size=32, num_hidden_layers=3, state_size=4, expand=2,
                                         conv_kernel=4, time_step_rank=2, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=1))
    with torch.no_grad():
        for i, block in enumerate(model.backbone.layers):
            if i != 1:
                block.mixer.out_proj.weight.zero_()
        conv = model.backbone.layers[1].mixer.conv1d
        conv.weight.zero_()
        conv.weight[:, 0, -2] = 1.0  # output at t = input at t - 1
        conv.bias.zero_()
        model.backbone.layers[1].mixer.A_log.fill_(-2.0)
    model.save_pretrained(root / "planted-mamba")
    tokenizer.save_pretrained(root / "planted-mamba")
    return root / "planted-mamba"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        lm = models.load(str(planted(Path(tmp))), device="cpu")
        print("| variant | p = 1 | p = 2 | p = 3 | p = 4 |\n|---|---|---|---|---|")
        for swap in (False, True):
            r = run_offbyone(lm, CircuitConfig(n_seqs=128, seq_len=129, device="cpu", swap_decay=swap), Path(tmp),
                             layer="1", progress=False)
            cells = " | ".join(f"{row['delta_logit_B']:+.3g}" for row in r.rows[TABLE])
            print(f"| {'--swap-decay (the notebook)' if swap else 'default (write only)'} | {cells} |")


if __name__ == "__main__":
    main()
