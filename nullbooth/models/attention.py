"""Recording the cross-attention (attn2) probabilities of chosen text tokens while a pipeline samples.

    recording   `record_attention(unet, positions, cond_half)` swaps every attn2 processor for a
                `RecordingProcessor` through diffusers' processor API (`unet.set_attn_processor`) and puts the
                original processors back on exit. The recorder returns exactly what the original processor returns
                (it calls it), so images are bit-identical with recording on or off; the probabilities come from a
                second evaluation of the layer's own `to_q`/`to_k` (LoRA-wrapped ones included, so they are the
                fine-tuned model's) and `attn.get_attention_scores`: softmax(q kᵀ · scale) over the text tokens.
    what        per (timestep, number of image positions) the mean over heads of P[b, q, token], summed over the
                attn2 layers of that resolution (`counts` says how many), for the token positions asked; with
                classifier-free guidance only the conditional half of the batch (the pipeline puts it second).
    tokens      `word_positions(tokenizer, prompt, word)`: the positions of a word's pieces in the prompt's token
                ids (BOS at 0), from the model's own tokenizer, so CLIP BPE words of several pieces give several.

The second `to_q`/`to_k` evaluation costs two small matmuls per attn2 call; forward hooks on those linears (as the
statistics stage uses) would see them twice, so never record while collecting statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from nullbooth.errors import NullBoothError


@dataclass
class AttentionRecord:
    """What one recording holds: maps[(timestep, n_image)] = Σ over attn2 layers of that resolution of the
    head-mean probabilities, (batch, n_image, len(positions)), float32 on CPU; counts[key] = layers summed."""

    positions: list[int] | None
    cond_half: bool
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[int, int], int] = field(default_factory=dict)
    timestep: int = -1
    keep_layers: bool = False  # tests: also keep every call's full probabilities in `calls`
    calls: list[dict] = field(default_factory=list)

    def add(self, name: str, probs: torch.Tensor, heads: int, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        batch = probs.shape[0] // heads
        probs = probs.reshape(batch, heads, *probs.shape[1:])
        if self.cond_half:
            probs = probs[batch // 2:]
        if self.keep_layers:
            self.calls.append({"layer": name, "timestep": self.timestep, "probs": probs.detach().cpu().clone(),
                               "hidden": inputs[0].detach().cpu().clone(), "text": inputs[1].detach().cpu().clone()})
        mean = probs.float().mean(dim=1)
        if self.positions is not None:
            mean = mean[..., self.positions]
        key = (self.timestep, int(probs.shape[2]))
        mean = mean.detach().cpu()
        self.maps[key] = self.maps[key] + mean if key in self.maps else mean.clone()
        self.counts[key] = self.counts.get(key, 0) + 1

    def mean_maps(self) -> dict[tuple[int, int], torch.Tensor]:
        """maps averaged over the layers of each resolution."""
        return {key: value / self.counts[key] for key, value in self.maps.items()}


class RecordingProcessor:
    """An attention processor that returns what `inner` returns and records attn.get_attention_scores(q, k)."""

    def __init__(self, inner, record: AttentionRecord, name: str):
        self.inner, self.record, self.name = inner, record, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        with torch.no_grad():
            self.record.add(self.name, *attention_probabilities(attn, hidden_states, encoder_hidden_states,
                                                                attention_mask, temb))
        return out


def attention_probabilities(attn, hidden_states, encoder_hidden_states, attention_mask=None, temb=None):
    """(probabilities (batch·heads, n_image, n_text), heads, (query input, key input)) exactly as diffusers'
    AttnProcessor prepares them, through the layer's own modules."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, sequence_length, _ = context.shape
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    return attn.get_attention_scores(query, key, attention_mask), attn.heads, (hidden_states, context)


@contextmanager
def record_attention(unet, positions: list[int] | None = None, cond_half: bool = False,
                     keep_layers: bool = False) -> Iterator[AttentionRecord]:
    """Record every attn2 layer of `unet` while the block runs; the original processors come back afterwards.

    positions: token positions to keep (None: all). cond_half: the batch is [unconditional; conditional]
    (classifier-free guidance) and only the conditional half is recorded.
    """
    record = AttentionRecord(list(positions) if positions is not None else None, cond_half, keep_layers=keep_layers)
    original = dict(unet.attn_processors)
    swapped = {name: RecordingProcessor(proc, record, name.removesuffix(".processor")) if ".attn2." in name else proc
               for name, proc in original.items()}
    if not any(isinstance(p, RecordingProcessor) for p in swapped.values()):
        raise NullBoothError("attention maps: the UNet has no cross-attention (attn2) processors to record")

    def note_timestep(_module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        record.timestep = int(round(float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)))

    hook = unet.register_forward_pre_hook(note_timestep, with_kwargs=True)
    unet.set_attn_processor(dict(swapped))  # diffusers pops from the dict it is given
    try:
        yield record
    finally:
        hook.remove()
        unet.set_attn_processor(dict(original))


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the padded token ids the text encoder sees, BOS at 0) of the first occurrence of `word`'s
    pieces in `prompt`; a NullBoothError when the word is not there or lies past the tokenizer's length."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    if not word.strip() or not pieces:
        raise NullBoothError(f"attention token {word!r}: empty after tokenizing")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    for start in range(len(ids) - len(pieces) + 1):
        # a whole word only: "pot" is not the last piece of "tea"+"pot</w>"
        boundary = start == 0 or ids[start - 1] in special or tokens[start - 1].endswith("</w>")
        if boundary and ids[start:start + len(pieces)] == pieces:
            return list(range(start, start + len(pieces)))
    full = tokenizer(prompt).input_ids
    where = ("past the tokenizer's length " f"{tokenizer.model_max_length}" if len(full) > len(ids) else "")
    raise NullBoothError(f"attention token {word!r} is not a word of the prompt {prompt!r}"
                         + (f" (or lies {where})" if where else ""))
