"""The toy model's text side: a word-level CLIP tokenizer and a frozen, randomly initialised CLIP text encoder.

Word-level: every word the world's captions use, the demo prompts and the identifier "sks" is a single token, so
the cross-attention keys of a caption are one row per word (the null-space analysis stays readable). It is a stock
`CLIPTokenizer` (byte-level BPE) whose merges build each whole word; other text still tokenizes, byte by byte.
The encoder is never trained. Its token embeddings are drawn at unit scale (`token_std`), not CLIP's 0.02: then
each word is a direction of its own in every output row, far above the position embeddings, as the words of a
trained CLIP are well separated. That matters to the null space: with CLIP's initial scale, the outputs of a random
encoder are mostly position and mixing, every token shares them, and a new identifier such as "sks" has no direction
of its own (0.19 of its norm lay in the text null space, about as much as any held-out caption's token); at unit
scale 0.78 of it does, against 0.05 on average for held-out captions (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import itertools

import torch

from nullbooth.errors import NullBoothError
from nullbooth.models.tokenizer import bytes_to_unicode
from nullbooth.models.toyworld import world
from nullbooth.prompts import DEMO_CLASS_PROMPT, DEMO_INSTANCE_PROMPT

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
IDENTIFIER = "sks"


def vocabulary_words() -> list[str]:
    """Every word of every caption template over every combination, the demo prompts and the identifier."""
    texts = [*world.every_caption(), DEMO_INSTANCE_PROMPT, DEMO_CLASS_PROMPT, IDENTIFIER]
    return sorted({w for t in texts for w in t.split()})


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    symbols = [*word[:-1], word[-1] + EOW]
    while len(symbols) > 1:
        pairs = list(itertools.pairwise(symbols))
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        i = pairs.index(best)
        symbols = [*symbols[:i], best[0] + best[1], *symbols[i + 2:]]
    return symbols


def _word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make each word one token; appended merges rank last, so earlier words stay whole."""
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(symbols := _apply_bpe(word, {p: r for r, p in enumerate(merges)})) > 1:
            merges.append((symbols[0], symbols[1]))
    return merges


def build_tokenizer(max_length: int = 16):
    """The word-level CLIP tokenizer; `max_length` must equal the text encoder's max_position_embeddings."""
    from transformers import CLIPTokenizer

    words = vocabulary_words()
    merges = _word_merges(words)
    base = bytes_to_unicode()
    tokens = dict.fromkeys([*base, *(b + EOW for b in base), *("".join(m) for m in merges), BOS, EOS])
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=max_length,
                              bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    for word in words:
        if len(tokenizer(word, add_special_tokens=False).input_ids) != 1:
            raise RuntimeError(f"toy tokenizer: word {word!r} is not a single token")
    longest = max(len(tokenizer(p).input_ids) for p in [*world.preserved_prompts(), *world.drift_prompts()])
    if longest > max_length:
        raise NullBoothError(f"toy tokenizer: max_length={max_length} is shorter than the longest caption ({longest})")
    return tokenizer


def build_text_encoder(tokenizer, *, width: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
                       token_std: float | None = 1.0):
    """A frozen random CLIPTextModel sized for the tokenizer; built under `seed` without touching global RNG.

    `token_std` is the standard deviation of the token embeddings (see the module docstring); None keeps CLIP's.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length, projection_dim=width,
                            hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
        if token_std is not None:
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0.0, token_std)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(N, max_length, width) embeddings exactly as StableDiffusionPipeline computes them (padded, no mask)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return torch.cat([text_encoder(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])


def caption_table(tokenizer, text_encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(embeddings, caption ids, empty): each distinct caption encoded once, the empty prompt last (row `empty`),
    and for every caption in `captions` its row. The training loops index this table instead of re-encoding."""
    unique = sorted(set(captions))
    embeddings = encode_prompts(tokenizer, text_encoder, [*unique, ""])
    where = {c: i for i, c in enumerate(unique)}
    return embeddings, torch.tensor([where[c] for c in captions]), len(unique)
