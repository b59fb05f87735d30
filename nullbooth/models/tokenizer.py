"""The tiny model's tokenizer: a CLIP-style byte-level BPE learned on the packaged preserved prompts.

The `tokenizers` library's BpeTrainer breaks ties between equally frequent pairs in an order that changes between
processes, so the merges are learned here, with ties broken by the pair's text: two builds are bit-identical.
The stock `CLIPTokenizer` does the tokenizing; only its vocabulary and merges come from this module.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from nullbooth.prompts import (
    DEMO_CLASS_PROMPT,
    DEMO_INSTANCE_PROMPT,
    DEMO_PROMPTS_FILE,
    read_prompts,
)

MAX_LENGTH = 32  # tokenizer model_max_length == text encoder max_position_embeddings
NUM_MERGES = 1000  # learned BPE merges; vocab = 512 byte symbols + merges + forced merges + 2 specials

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"




def bytes_to_unicode() -> list[str]:
    """The GPT-2/CLIP byte -> printable character table, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _pretokenizer():
    """A stock CLIPTokenizer's normalizer + pre-tokenizer, so training sees exactly the words inference sees."""
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer
    return backend.normalizer, backend.pre_tokenizer


def _corpus_words(lines: Iterable[str]) -> Counter[str]:
    normalizer, pre_tokenizer = _pretokenizer()
    words: Counter[str] = Counter()
    for line in lines:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[piece] += 1
    return words


def _split_word(word: str) -> list[str]:
    # CLIP marks the end of a word on its last symbol: "dog" -> d, o, g</w>.
    return [*word[:-1], word[-1] + EOW]


def _pairs(symbols: list[str]) -> list[tuple[str, str]]:
    return list(itertools.pairwise(symbols))


def _merge_symbols(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_bpe(words: Counter[str], num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Learn BPE merges from word counts, most frequent pair first, ties broken by the pair's text.

    Why not `tokenizers.trainers.BpeTrainer`: it breaks ties between equally frequent pairs by internal ids that
    depend on randomly seeded hash maps, so every process learns a different merge order (checked with
    tokenizers 0.23, also single-threaded), and the tiny model must be bit-identical wherever it is built.
    """
    symbols = [_split_word(w) for w in sorted(words)]
    freqs = [words[w] for w in sorted(words)]
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, syms in enumerate(symbols):
        for pair in _pairs(syms):
            counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    # Max-heap by count with lazy deletion: an entry is stale when its count no longer matches.
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or -neg <= 0:
            continue
        if -neg < min_frequency:
            break
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            old, new = symbols[i], _merge_symbols(symbols[i], pair)
            for p in _pairs(old):
                counts[p] -= freqs[i]
                touched.add(p)
            for p in _pairs(new):
                counts[p] += freqs[i]
                where.setdefault(p, set()).add(i)
                touched.add(p)
            symbols[i] = new
        counts.pop(pair, None)
        for p in touched:
            if p != pair and counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenize one pre-tokenized word with ranked merges, as the BPE model does at inference."""
    symbols = _split_word(word)
    while len(symbols) > 1:
        best = min(_pairs(symbols), key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        symbols = _merge_symbols(symbols, best)
    return symbols


def _force_single_tokens(merges: list[tuple[str, str]], words: Iterable[str]) -> list[tuple[str, str]]:
    """Append the lowest-priority merges that make each given word one token (e.g. the identifier "sks").

    The identifier is kept out of the training corpus on purpose: like "sks" in real CLIP, it is a token the
    preserved prompts never use.
    """
    merges = list(merges)
    normalizer, pre_tokenizer = _pretokenizer()
    for word in words:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(word)):
            for _ in range(len(piece)):
                symbols = _apply_bpe(piece, {p: r for r, p in enumerate(merges)})
                if len(symbols) == 1:
                    break
                merges.append((symbols[0], symbols[1]))
    return merges


def _demo_words() -> list[str]:
    return sorted(set(DEMO_INSTANCE_PROMPT.split()) | set(DEMO_CLASS_PROMPT.split()))


def build_tokenizer(prompts_file: Path = DEMO_PROMPTS_FILE):
    """A CLIP-style byte-level BPE tokenizer learned on the preserved prompts (plus the demo class prompt).

    Vocabulary in CLIP's order: 256 byte symbols, the same 256 with "</w>", one token per merge, then
    <|startoftext|> and <|endoftext|> (also the pad token, as in SD).
    """
    from transformers import CLIPTokenizer

    corpus = [*read_prompts(prompts_file), DEMO_CLASS_PROMPT]
    merges = train_bpe(_corpus_words(corpus), NUM_MERGES)
    merges = _force_single_tokens(merges, _demo_words())
    base = bytes_to_unicode()
    # Two merge paths can produce the same token ("a bc", "ab c"); it gets the id of its first occurrence.
    tokens = dict.fromkeys([*base, *(b + EOW for b in base), *("".join(m) for m in merges), BOS, EOS])
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),  # pairs; the stock constructor rejects "a b" strings
        model_max_length=MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    for word in _demo_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer: demo word {word!r} is not a single token: {ids}")
    return tokenizer
