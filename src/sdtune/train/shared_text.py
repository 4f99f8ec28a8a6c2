"""Cross-attention that projects each distinct caption's text once per batch.

When the text encoders are frozen, their outputs are cached per caption, and a batch often holds one caption
several times: DreamBooth's instance prompt, a class prompt, a short caption list. The UNet's cross-attention
key and value projections of those 77 text tokens are then one product repeated per sample, and on SDXL
(2048-wide text features) they are most of a step's work at small resolutions. Here the UNet gets the
batch's distinct text rows plus ``text_rows`` (the row each sample reads, passed as a cross-attention
keyword): keys and values are projected once per distinct row and then gathered, and the gather's backward
sums the samples' gradients into their row. The function and its gradients are the same; only the order in
which a LoRA's gradient terms are summed changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0


class SharedTextProcessor:
    """diffusers' default attention, plus the ``text_rows`` gather for cross-attention."""

    def __init__(self):
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 text_rows: torch.Tensor | None = None) -> torch.Tensor:
        if text_rows is None or encoder_hidden_states is None:  # self-attention, or a batch of distinct captions
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if (attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.norm_cross or hidden_states.ndim != 3):  # layouts SD's UNets do not use: plain, per sample
            return self.plain(attn, hidden_states, encoder_hidden_states.index_select(0, text_rows), attention_mask,
                              temb)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        # index_select, not [text_rows]: its backward is an index_add (~25 us here), where indexing's is an
        # index_put with accumulation (~400 us a call; 140 calls made it a sixth of an SDXL step)
        key = attn.to_k(encoder_hidden_states).index_select(0, text_rows)
        value = attn.to_v(encoder_hidden_states).index_select(0, text_rows)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install(unet) -> Callable[[], None] | None:
    """Put the processor on every attention layer of ``unet``; returns the undo. A UNet with processors of its
    own (IP-Adapter, custom attention) keeps them, and gets None: its batches are not shared."""
    before = unet.attn_processors
    if not all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in before.values()):
        return None
    unet.set_attn_processor(SharedTextProcessor())
    return lambda: unet.set_attn_processor(before)


def distinct_rows(captions: list[str]) -> tuple[list[str], torch.Tensor | None]:
    """The captions once each, in first-seen order, and each caption's row among them (None when all differ)."""
    distinct = list(dict.fromkeys(captions))
    if len(distinct) == len(captions):
        return captions, None
    row = {c: i for i, c in enumerate(distinct)}
    return distinct, torch.tensor([row[c] for c in captions])
