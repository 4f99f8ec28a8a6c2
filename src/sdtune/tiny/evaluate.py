"""How well the built-in model draws what it is asked: generate, let the judge score, print a table.

Held-in prompts should mostly be right (target: >= 80% show the prompted shape and colour). Held-out
concepts were never shown to the diffusion model: an unseen shape and the outline style it should fail on (the
baseline TI and LoRA training must beat), and colour-shape pairs it never saw together, which it composes from
the words (so those pass).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..console import note
from ..families import TINY, TINY_XL
from ..generate import generate
from ..safeio import SdtuneError
from . import judge, world

HELD_IN = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
           ("purple", "cross"), ("orange", "diamond"), ("pink", "hexagon"), ("cyan", "circle")]
HELD_OUT = [  # (label, prompt, what the judge should see)
    ("heart (unseen shape)", "a photo of a red heart", dict(shape="heart", colour="red")),
    *[(f"{c} {s} (unseen pair)", f"a photo of a {c} {s}", dict(shape=s, colour=c))
      for c, s in world.HELD_OUT_PAIRS],
    ("outline style (unseen)", "a blue circle on a white background, outline style",
     dict(shape="circle", colour="blue", style="outline")),
]


@dataclass
class Row:
    label: str
    prompt: str
    n: int
    scores: dict

    @property
    def hit(self) -> float:
        return self.scores["all"]


def evaluate(base, images_per_prompt: int = 8, steps: int = 20, guidance: float = 5.0, seed: int = 0,
             progress: bool = False) -> tuple[list[Row], list[Row]]:
    """(held-in rows, held-out rows); each row scores ``images_per_prompt`` images of one prompt."""
    if images_per_prompt < 1:  # before generate's own check, which names its --num-images
        raise SdtuneError(f"--images {images_per_prompt}: must be at least 1")
    if base.family not in (TINY, TINY_XL):  # the architectures the recipe trains on the world
        note(f"{base.name or 'this model'} is an {base.family.name} model, not one trained on the shapes world: the "
             f"judge knows only that world's flat shapes, so these numbers do not measure how well it draws")
    def run(label, prompt, wanted):
        imgs = [g.image for g in generate(base, prompt, steps=steps, guidance=guidance, seed=seed,
                                          num_images=images_per_prompt, batch_size=images_per_prompt,
                                          progress=progress)]
        return Row(label, prompt, len(imgs), judge.score(imgs, **wanted))

    held_in = [run(f"{c} {s}", f"a {c} {s} on a white background", dict(shape=s, colour=c)) for c, s in HELD_IN]
    held_out = [run(*item) for item in HELD_OUT]
    return held_in, held_out


def overall(rows: list[Row]) -> float:
    """The share of all the rows' images that are right."""
    return sum(r.hit * r.n for r in rows) / max(1, sum(r.n for r in rows))


def check_held_in(held_in: list[Row], minimum: float | None) -> None:
    """Refuse (for a script or CI) a model whose held-in share is below ``minimum`` percent."""
    if minimum is not None and 100 * overall(held_in) < minimum:
        raise SdtuneError(f"held-in overall {overall(held_in):.0%} is below --min-held-in {minimum:g}%")


def table(held_in: list[Row], held_out: list[Row]) -> str:
    # "all": every asked thing right (shape and colour, and the style where the prompt asks one)
    lines = [f"{'prompt':<34} {'images':>6} {'shape':>6} {'colour':>6} {'style':>6} {'all':>6}", "-" * 69]

    def add(rows):
        for r in rows:
            s = r.scores
            style = f"{s['style']:>6.0%}" if "style" in s else f"{'':>6}"
            lines.append(f"{r.label:<34} {r.n:>6} {s.get('shape', 0):>6.0%} {s.get('colour', 0):>6.0%} {style} "
                         f"{r.hit:>6.0%}")

    lines.append("held-in (target: all >= 80% overall)")
    add(held_in)
    total = overall(held_in)
    lines.append(f"{'held-in overall':<34} {sum(r.n for r in held_in):>6} {'':>6} {'':>6} {'':>6} {total:>6.0%}")
    lines.append("held-out (never trained on: the unseen shape and style should fail, the base's baseline for TI and "
                 "LoRA; unseen pairs it composes from the words)")
    add(held_out)
    return "\n".join(lines)
