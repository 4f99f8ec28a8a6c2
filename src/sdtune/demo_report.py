"""The demo's ``index.html``: the page is ``templates/demo_report.html`` (a ``string.Template``); this module
fills it with the scores, grids, files, commands and timings that ``sdtune.demo`` computed.

Every value is HTML-escaped on its way into the page, except the fragments built here from the row
templates below (which escape their own values).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template

from .pages import Html, fill, lines
from .safeio import atomic_write_text

PAGE = "templates/demo_report.html"

SCORE_ROW = Template('<tr><td>$what (<a href="$grid">grid</a>)</td><td class="small">$before_label</td>'
                     '<td class="num">$before</td><td class="small">$after_label</td><td class="$after_class">$after</td>'
                     '<td class="num">$n</td></tr>')
SWEEP_ROW = Template('<tr><td class="num">$weight</td><td class="num">$style</td><td class="num">$content</td></tr>')
MIX_ROW = Template('<tr><td>$label</td><td class="num">$concept</td><td class="num">$style</td></tr>')
GRID = Template('<h3>$title</h3><p><a href="$file"><img src="$file" alt="$title"></a></p><p class="small">'
                'Single images: $cells files <code>$name-RR-CC.png</code>; axes and settings in '
                '<a href="$json">$json</a> and in the PNG\'s <code>parameters</code> text.</p><pre>$command</pre>')
OUTPUT = Template('<li>$label: <a href="$path">$path</a></li>')
TIMING_ROW = Template('<tr><td>$name</td><td class="num">$seconds</td><td class="small">$note</td></tr>')

QUICK_NOTE = (' This is a <b>quick</b> run (few training steps, few images): a first look at the pipeline, '
              'not at what TI and LoRA can do. Run <code>sdtune demo</code> without <code>--quick</code> for that.')


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def write_report(out: Path, plan, quick: bool, model: str, model_hash: str, scores: dict, commands: list,
                 files: dict, timings: dict) -> Path:
    """``out/index.html``: every image and file it shows is in ``out`` (relative links).

    ``plan``: the demo's ``Plan``; ``scores``: what ``demo.compute_scores`` returned; ``commands``: [(title,
    command line)]; ``files``: {"grids": [{name, title, file, json, cells, command}], "outputs": [(label,
    path)]}; ``timings``: {phase: {"seconds": s, "reused": bool}}.
    """
    score_rows = [fill(SCORE_ROW, what=row["what"], grid=row["grid"], before_label=row["before_label"],
                       before=_pct(row["before"]["value"]), after_label=row["after_label"],
                       after=_pct(row["after"]["value"]), n=row["after"]["n"],
                       after_class="num up" if row["after"]["value"] > row["before"]["value"] else "num")
                  for row in scores["scores"]]
    sweep_rows = [fill(SWEEP_ROW, weight=f"{s['weight']:g}", style=_pct(s["style"]["value"]),
                       content=_pct(s["content"]["value"])) for s in scores["sweep"]]
    mix_rows = [fill(MIX_ROW, label=m["label"], concept=_pct(m["concept"]["value"]), style=_pct(m["style"]["value"]))
                for m in scores["mix"]]
    grids = [fill(GRID, **g) for g in files["grids"]]
    outputs = [fill(OUTPUT, label=label, path=path) for label, path in files["outputs"]]
    timing_rows = [fill(TIMING_ROW, name=name, seconds=f"{t['seconds']:.0f}",
                        note="reused from an earlier run" if t.get("reused") else "") for name, t in timings.items()]
    page = Template(resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8"))
    text = fill(page, model=model, model_hash=model_hash, run="quick" if quick else "full",
                quick_note=Html(QUICK_NOTE if quick else ""), ti_images=plan.ti_images,
                concept=f"{plan.colour} {plan.shape}", token=plan.token, init_token=plan.init_token,
                lora_images=plan.lora_images, style=plan.style, score_rows=lines(score_rows),
                sweep_rows=lines(sweep_rows), mix_rows=lines(mix_rows), grids=lines(grids),
                outputs=lines(outputs), commands="\n".join(f"# {title}\n{cmd}" for title, cmd in commands),
                timing_rows=lines(timing_rows), total=f"{sum(t['seconds'] for t in timings.values()):.0f}")
    path = out / "index.html"
    atomic_write_text(text, path)
    return path
