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


def learn_bpe(words) -> list[tuple[str, str]]:
    """Byte-pair merges that spell each word as one token (Sennrich et al. 2016, each word once).

    The pair to merge next is the most frequent one, ties broken by the pair's string order,
    so the same words always give the same merges and ids. (The ``tokenizers`` BPE trainer
    breaks ties in hash-map order: two builds in one process gave different vocabularies, and
    a text encoder trained on one would read another's ids as other words.) Merging in this
    order is what CLIP's greedy BPE replays on a word, so each training word comes back whole.
    """
    from collections import Counter

    enc = bytes_to_unicode()
    segs = []
    for w in sorted(set(words)):
        chars = [enc[b] for b in w.encode("utf-8")]
        segs.append(chars[:-1] + [chars[-1] + "</w>"])
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in segs for p in zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, s in enumerate(segs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            segs[i] = out


def build_clip_tokenizer(out_dir: str | Path, words=WORDS):
    """Write vocab.json / merges.txt / configs to ``out_dir`` and return the tokenizer.

    Deterministic: the same ``words`` give byte-identical files (:func:`learn_bpe`)."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_bpe(words)
    # ids: the 512 byte tokens (alone and word-final), then each merge's product in merge order
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges]:
        vocab.setdefault(tok, len(vocab))
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
