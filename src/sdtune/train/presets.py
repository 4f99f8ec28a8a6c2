"""Recommended training settings: named presets, and the one each model family starts from.

A preset is a few settings with a one-line purpose; every setting it does not name keeps the default of
``LoraSettings`` / ``TISettings``. Which preset a run starts from, in order: ``--preset`` (or ``preset =`` in
the TOML file), else the base model's own (``FAMILY_DEFAULTS``, looked up by ``base.family.name``). Then the
TOML file, then the flags override single settings (``config.load_settings``).

Why the model decides: the usual SD 1.5 values (rank 16, lr 1e-4, batch 1, 1,000 steps) learn nothing on the
built-in tiny model in that time, and a rank-8 LoCon at lr 1e-3 would wreck SD 1.5. The tiny model's recipes
are tuned on it (the demo and ``tests/test_train_quality.py`` use them; the why of each choice is beside
it). The SD families get the community's usual starting points (kohya-ss for LoRA, A1111/diffusers for TI),
at each family's native size.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .. import families
from ..safeio import SdtuneError


@dataclass(frozen=True)
class Preset:
    name: str
    purpose: str  # one line: what it is for (``--list-presets`` shows it)
    values: dict = field(default_factory=dict)  # the settings it sets
    # --algo (or "boft": --algo oft --oft-butterfly) -> settings that algorithm needs instead of ``values``' (a
    # LoKr's learning rate); the file and flags still override them
    by_algo: dict[str, dict] = field(default_factory=dict)

    def for_algo(self, algo: str, butterfly: bool = False) -> dict:
        """The settings this preset gives a run of ``algo`` (``butterfly``: OFT as BOFT)."""
        return {**self.values, **self.by_algo.get("boft" if algo == "oft" and butterfly else algo, {})}

    def settings(self) -> set[str]:
        """The names of the settings it gives some run."""
        return set(self.values).union(*self.by_algo.values())


# The built-in tiny model, LoRA. LoCon (``targets = "all"``, the resnet convs included): a drawing style is
# largely convolutional; attention + feed-forward alone learned it by bending shape and colour (held-in
# shape+colour under the LoRA, 8 images per prompt: 84-88% vs 94-98%, seeds 0-2). Min-SNR as in the tiny
# model's own training: without it the LoRA spends its steps on the nearly clean timesteps the base weighted
# least (content kept: 62% without, 80% with, on an earlier CPU-trained model). A tenth of the images is held
# out for the validation loss (48 images: 5).
_TINY_LORA = dict(targets="all", rank=8, alpha=8.0, lr=1e-3, batch_size=8, steps=300, min_snr_gamma=5.0,
                  validation_split=0.1, validation_every=50, save_every=100, sample_every=100, sample_images=2,
                  sample_guidance=5.0)
# The built-in tiny model, TI: a handful of images of one concept, so nothing is held out (the validation loss
# is then measured on training images at fixed noise: still a steady, comparable curve, not a test of
# generalisation). One vector, as A1111 starts: it learns the quality test's cyan triangle in 16 of 16
# images (seeds 1000 and 2000), as two vectors did.
_TINY_TI = dict(steps=400, lr=5e-3, batch_size=4, validation_every=50, save_every=100, sample_every=100,
                sample_images=2, sample_guidance=5.0)
# The built-in tiny SDXL model: the same recipes, at 400 steps each, and no LoRA on the cross-attention's key and
# value (the text's way in). On the tiny-xl shipped before 2026-12-02 the colours were less settled: with 400 TI
# steps the quality test's cyan triangle came out in 11 of 16 images (600: 16), and the style LoRA with a key and
# value drew outline in 72% at 300 steps, 100% at 500, keeping shape+colour in 81-84% (lr 5e-4 or 2e-3, rank 4,
# attention + feed-forward, no Min-SNR, 800 steps: each 56-88% and 69-81%); without the key and value, 94% outline
# and 100% shape+colour (without a LoRA on time_emb_proj instead, where SDXL's pooled text enters: 75%). On the
# shipped tiny-xl, 400 steps of each (training seeds 0 and 1): the triangle in 16 of 16 images (render seeds 1000
# and 2000), outline 100% with shape+colour 97% (94% base); 500 LoRA and 600 TI steps gave 100%/88% and 16 of 16
# in 25-80% more training time. Sample grids at the start, the middle and the end: a grid costs about 20 steps.
_TINY_XL_LORA = dict(_TINY_LORA, steps=400, sample_every=200, exclude=[r"attn2\.to_[kv]$"])
# LoKr on the tiny models: its Kronecker factors hold far fewer numbers than a LoRA of the same rank (each weight
# change is a product of two small factors' entries), and at the LoRA's lr 1e-3 the quality test's style came out in
# 53% of images on tiny and on tiny-xl; at 3e-3, 88% on tiny (shape and colour kept in 97%) and 81% on tiny-xl (94%,
# as its base). LoHa and DoRA learn at 1e-3 (94%, 97% on tiny). IA3 (a scale per row) at 1e-3 drew it in 12% on tiny;
# on all layers at 1e-2, 91% but shape and colour fell to 81% (7e-3: 75% and 88%); on attention + feed-forward, as
# the IA3 paper trains it, 1.5e-2 gave 94% with 91% kept (1e-2: 78%). On tiny-xl IA3 learns less: on all layers at
# 1.5e-2, 69% with 88% kept (base 94%; 1e-2: 66%; attention + feed-forward at 1e-2 to 2e-2: 59-62%, keeping 78-91%).
# BOFT's butterfly turns more than OFT's one stage: at the LoRA's 1e-3 it drew 94% keeping only 56%, at 5e-4 97%
# keeping 91%, at 3e-4 97% keeping 97% (tiny-xl: 88% keeping 91%). Full (every trained weight's whole change):
# 3e-5 41%, 1e-4 84%, 3e-4 91% keeping 97%, 6e-4 91% keeping 94%, 1e-3 84% keeping 88%. (2 cores, 2026-12-06 for
# IA3, BOFT and full.)
# The SD presets keep kohya's LoRA lr for every algorithm but IA3, which LyCORIS's authors say needs about
# 5e-3 to 1e-2 (their algorithm list, from their SD experiments); at the LoRA's 1e-4, a fiftieth of it, a run
# would learn nearly nothing (on tiny, a tenth of IA3's lr drew the style in 12% of images); and full (whole
# weights, as fine-tuning changes them), at the 5e-6 diffusers' DreamBooth example fine-tunes SD with: the LoRA's
# 1e-4 moves every weight twenty times as far a step. Nothing here measured the other algorithms on those models.
_TINY_BY_ALGO = {"lokr": {"lr": 3e-3}, "ia3": {"lr": 1.5e-2, "targets": "attn+ff"}, "boft": {"lr": 3e-4},
                 "full": {"lr": 3e-4}}
_TINY_XL_BY_ALGO = {**_TINY_BY_ALGO, "ia3": {"lr": 1.5e-2}}
_TINY_XL_TI = dict(_TINY_TI, steps=400, sample_every=200)
_SD_BY_ALGO = {"ia3": {"lr": 5e-3}, "full": {"lr": 5e-6}}
# samples at the start and the end only: on the tiny model a sample grid costs about as much as 20 steps
_QUICK = dict(steps=30, validation_every=0, save_every=10, sample_every=30)

# kohya-ss's usual LoRA: attention + feed-forward + proj_in/out (its default module set), Min-SNR 5, cosine.
_KOHYA = dict(targets="attn+ff", lr=1e-4, min_snr_gamma=5.0, lr_scheduler="cosine", buckets=True,
              save_every=250, sample_every=250, sample_steps=25)
# A1111's and diffusers' usual TI: lr 5e-3 over an effective batch of 4.
_A1111_TI = dict(lr=5e-3, batch_size=1, grad_accum=4, steps=2000, save_every=250, sample_every=250, sample_steps=25)

LORA = [
    Preset("tiny", "the built-in tiny model: learn a style or a look from ~50 captioned images in about a minute "
           "on a CPU (LoCon rank 8, lr 1e-3 (LoKr 3e-3, BOFT and full 3e-4, IA3 1.5e-2 on attn+ff), 300 steps of 8, "
           "Min-SNR 5)", _TINY_LORA, _TINY_BY_ALGO),
    Preset("tiny-quick", "the built-in tiny model: a 30-step smoke test of your data and flags (learns little)",
           {**_TINY_LORA, **_QUICK, "batch_size": 4}, _TINY_BY_ALGO),
    Preset("tiny-xl", "the built-in tiny SDXL model: as tiny, 400 steps, no LoRA on the cross-attention's key and "
           "value (IA3 on all layers)", _TINY_XL_LORA, _TINY_XL_BY_ALGO),
    Preset("sd1", "SD 1.x at 512 px: kohya's usual LoRA for a character, object or style (rank 16, alpha 8, "
           "lr 1e-4 (IA3 5e-3, full 5e-6), batch 2, 1,500 steps)",
           {**_KOHYA, "rank": 16, "alpha": 8.0, "batch_size": 2, "steps": 1500, "resolution": 512}, _SD_BY_ALGO),
    Preset("sd2", "SD 2.x at its own size (768 px for 768-v, 512 for base): kohya's usual LoRA (rank 16, alpha 8, "
           "lr 1e-4 (IA3 5e-3, full 5e-6), batch 2, 1,500 steps)",
           {**_KOHYA, "rank": 16, "alpha": 8.0, "batch_size": 2, "steps": 1500}, _SD_BY_ALGO),
    Preset("sdxl", "SDXL at 1024 px: kohya's usual LoRA (rank 32, alpha 16, lr 1e-4 (IA3 5e-3, full 5e-6), batch "
           "1, 2,000 steps, gradient checkpointing)",
           {**_KOHYA, "rank": 32, "alpha": 16.0, "batch_size": 1, "steps": 2000, "resolution": 1024,
            "gradient_checkpointing": True}, _SD_BY_ALGO),
]
TI = [
    Preset("tiny", "the built-in tiny model: a new word for an object from ~5 images in about a minute on a CPU "
           "(lr 5e-3, 400 steps of 4)", _TINY_TI),
    Preset("tiny-quick", "the built-in tiny model: a 30-step smoke test of your data and flags (learns little)",
           {**_TINY_TI, **_QUICK}),
    Preset("tiny-xl", "the built-in tiny SDXL model: as tiny, samples at the start, middle and end", _TINY_XL_TI),
    Preset("sd1", "SD 1.x at 512 px: A1111's usual embedding for an object or style (lr 5e-3, batch 4, "
           "2,000 steps)", {**_A1111_TI, "resolution": 512}),
    Preset("sd2", "SD 2.x at its own size (768 px for 768-v, 512 for base): A1111's usual embedding (lr 5e-3, "
           "batch 4, 2,000 steps)", _A1111_TI),
    Preset("sdxl", "SDXL at 1024 px: the usual embedding (lr 5e-3, batch 4, 2,000 steps, gradient checkpointing)",
           {**_A1111_TI, "resolution": 1024, "gradient_checkpointing": True}),
]
PRESETS: dict[str, dict[str, Preset]] = {"lora": {p.name: p for p in LORA}, "ti": {p.name: p for p in TI}}

# family name (``sdtune.families``) -> the preset a run on that model starts from, per kind of training
FAMILY_DEFAULTS = {"tiny": "tiny", "tiny-xl": "tiny-xl", "sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}


def get(kind: str, name: str) -> Preset:
    """The ``kind`` preset ``name``, or one line naming the choices."""
    table = PRESETS[kind]
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SdtuneError(f"--preset {name!r}: no such {kind} preset; {hint}choose one of {', '.join(table)} "
                      f"(sdtune train {kind} --list-presets says what each is for)")


def for_family(kind: str, family) -> Preset | None:
    """The preset a model of ``family`` (a ``Family`` or its name) starts from; None for an unknown family."""
    name = FAMILY_DEFAULTS.get(getattr(family, "name", family))
    return PRESETS[kind][name] if name else None


def listing(kind: str) -> str:
    """``--list-presets``: each preset's name and purpose, and which model family starts from it."""
    table = PRESETS[kind]
    width = max(map(len, table))
    lines = [f"{kind} presets (sdtune train {kind} --preset NAME; flags and the --config file override them):"]
    for p in table.values():
        users = [families.FAMILIES[f].title for f, name in FAMILY_DEFAULTS.items() if name == p.name]
        default = f" [default for {', '.join(users)}]" if users else ""
        lines.append(f"  {p.name:<{width}}  {p.purpose}{default}")
    return "\n".join(lines)
