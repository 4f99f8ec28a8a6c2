"""Pivotal tuning: a new word and a LoRA trained together (``sdtune train lora --ti-token '<tok>' --ti-init W``).

The word is Textual Inversion's (``ti``: its rows start from the init text's tokens and are spliced into each
text encoder's token table as one small trainable parameter, every other row frozen); the LoRA learns what a
word alone cannot say. The word has its own learning rate (``--ti-lr``) and may stop after ``--ti-steps``
steps (its learning rate is then 0, so its rows stay exactly as they were), after which the LoRA goes on
around a fixed pivot.

Each save puts the word inside the LoRA file, in the layout A1111 loads with the LoRA
(``bundle_emb.<tok>.string_to_param.*``; SDXL ``bundle_emb.<tok>.clip_l`` / ``.clip_g``), and beside it on
its own (``<tok>.safetensors``, diffusers' layout, which A1111 reads too). sdtune loads the word with such a
LoRA and unloads it with it (``lora.patch.LoraSet``). The base is left as it was: the word is taken out again
at the end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..lora.formats import bundle
from ..lora.neutral import Lora
from ..safeio import SdtuneError
from ..ti.formats import Embedding, file_stem, save_embedding
from .config import LoraSettings, TISettings
from .ti import SplicedEmbedding, add_token, embedding_set, training_facts

STATE_KEY = "pivotal:rows"  # the word's rows in the resume state (one entry per text encoder key)


def check_captions(captions, token: str, folder) -> None:
    """The word must be in the captions, or it learns nothing (CLIP lowercases prompts, so case is free)."""
    if not any(token.lower() in (c or "").lower() for c in captions):
        raise SdtuneError(f"{folder}: no caption mentions {token}; put --ti-token {token} in the captions of the "
                          f"images that show the concept (e.g. 'a photo of {token}')")


class Pivot:
    """The new word of one pivotal-tuning run: added to ``base``'s embeddings, trainable while installed."""

    def __init__(self, base, settings: LoraSettings):
        self.base, self.settings = base, settings
        self.token = settings.ti_token
        self.embeddings = embedding_set(base)
        add_token(base, TISettings(token=settings.ti_token, init_token=settings.ti_init,
                                   num_vectors=settings.ti_vectors))
        self.splices: dict[str, tuple[torch.nn.Module, torch.nn.Module, SplicedEmbedding]] = {}
        try:
            for te, model, _ in base.text_encoders():
                ids = self.embeddings.ids(self.token, te.embedding_key)
                if ids != list(range(ids[0], ids[0] + len(ids))):
                    raise SdtuneError(f"--ti-token {self.token}: its ids {ids} are not consecutive; train on a fresh "
                                      f"model")
                table = model.get_input_embeddings()
                spliced = SplicedEmbedding(table, ids[0], table.weight.detach()[ids]).to(table.weight.device)
                self.splices[te.embedding_key] = (model, table, spliced)
        except BaseException:
            self.embeddings.remove(self.token)
            raise
        stem = file_stem(self.token)
        self.stem = stem if stem != settings.name else f"{stem}-embedding"

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [spliced.rows for _, _, spliced in self.splices.values()]

    def param_group(self) -> dict:
        """The optimizer group of the word: its own learning rate, and when to stop (the loop reads
        ``stop_after``)."""
        return {"params": self.params, "lr": self.settings.ti_lr, "stop_after": self.settings.ti_steps,
                "name": "embedding"}

    def install(self) -> None:
        for model, _, spliced in self.splices.values():
            model.set_input_embeddings(spliced)

    def uninstall(self) -> None:
        for model, table, _ in self.splices.values():
            model.set_input_embeddings(table)

    def remove(self) -> None:
        """Take the word out of the base again (the tokenizer and tables as they were before)."""
        self.uninstall()
        self.embeddings.remove(self.token)

    def parts(self) -> dict[str, torch.Tensor]:
        """The word's current rows by embedding key ("" for one text encoder; SDXL "clip_l", "clip_g")."""
        return {key: spliced.rows.detach().float().cpu().clone() for key, (_, _, spliced) in self.splices.items()}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{STATE_KEY}:{key}": rows for key, rows in self.parts().items()}

    def load_state(self, state: dict, source: Path) -> dict:
        """Take the word's rows out of a resume state; returns the rest (the LoRA's)."""
        rest = {k: v for k, v in state.items() if not k.startswith(STATE_KEY + ":")}
        for key, (_, _, spliced) in self.splices.items():
            rows = state.get(f"{STATE_KEY}:{key}")
            if rows is None or tuple(rows.shape) != tuple(spliced.rows.shape):
                raise SdtuneError(f"{source}: holds no {tuple(spliced.rows.shape)} rows for {self.token}; use the "
                                  f"same --ti-token and --ti-vectors to resume, or another --out")
            with torch.no_grad():
                spliced.rows.copy_(rows)
        return rest

    def bundled(self, lora: Lora) -> Lora:
        """``lora`` with the word bundled in (the kohya writer saves it as A1111's ``bundle_emb`` keys)."""
        out = dataclasses.replace(lora, embeddings=dict(lora.embeddings))
        bundle(out, self.token, self.parts())
        return out

    def save(self, out: Path, step: int, final: bool) -> Path:
        """The word on its own, beside the LoRA file: ``<tok>.safetensors`` (``-stepNNNNNN`` for snapshots)."""
        path = out / (f"{self.stem}.safetensors" if final else f"{self.stem}-step{step:06d}.safetensors")
        emb = Embedding.from_parts(self.token, self.parts(), str(path), "diffusers",
                                   training_facts(self.base, self.settings, step))
        save_embedding(emb, path, format="diffusers")
        return path
