"""A small CLIP BPE tokenizer built offline from a word list.

SD v2.1's tokenizer (CLIP BPE, 49,408 tokens) is downloaded from a hub; we can't.
This builds a *real* ``CLIPTokenizer`` (byte-level BPE with ``</w>`` word ends,
``<|startoftext|>``/``<|endoftext|>``, max length 77) whose merges spell out each word
of our caption grammar as one token. Any other text still tokenizes: every byte is
in the vocabulary, so unknown words fall back to sub-word or byte tokens.
"""

from __future__ import annotations

import json
from pathlib import Path



def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

# words of the scene grammar plus a few common ones users type
WORDS = (
    "a an the of and with on in left right above below next to "
    "red green blue yellow magenta cyan purple orange white black grey gray "
    "circle square triangle cross shape shapes object objects small large big "
    "photo picture image background"
).split()

MODEL_MAX_LENGTH = 77  # as SD / CLIP


def build_clip_tokenizer(out_dir: str | Path, words=WORDS):
    """Write vocab.json / merges.txt / configs to ``out_dir`` and return the tokenizer."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Learn the merges with a real BPE trainer on the word list: the learned merge
    # order reproduces each word as one token under greedy BPE (hand-made chains
    # conflict, e.g. "r i" of "right" would split "triangle").
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_chars = list(bytes_to_unicode().values())
    alphabet = byte_chars + [c + "</w>" for c in byte_chars]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + sum(len(w) for w in words),  # room for every chain
        min_frequency=1,
        initial_alphabet=byte_chars,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)], trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    for tok in alphabet + sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MODEL_MAX_LENGTH,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(out)
    return tok
