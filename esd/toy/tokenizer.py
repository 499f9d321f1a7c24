"""A real CLIP byte-level BPE tokenizer with a small vocabulary learned from a word list.

The vocabulary holds, like CLIP's, every byte symbol alone and with the word-end
mark ``</w>``, so any text tokenizes; the merges are learned by byte-pair encoding
(Sennrich et al., 2016) on the given words until each is a single token.
"""

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first (ties: alphabetical), until every word is one symbol."""
    byte_map = bytes_to_unicode()
    seqs = []
    for w in sorted(set(words)):
        symbols = [byte_map[b] for b in w.lower().encode("utf-8")]
        symbols[-1] += "</w>"
        seqs.append(symbols)
    merges = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    base = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_clip_tokenizer(words: list[str], folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    tok = build_clip_tokenizer(words, model_max_length)
    tok.save_pretrained(str(folder))
    return tok


if __name__ == "__main__":  # quick look: python -m esd.toy.tokenizer red green circle
    import sys

    t = build_clip_tokenizer(sys.argv[1:] or ["red", "green", "circle"])
    print(json.dumps({w: t.tokenize(w) for w in sys.argv[1:] + ["unknownword"]}))
