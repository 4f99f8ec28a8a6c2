"""The everyday workflow in a few calls: load a base, add adapters by name, generate.

    from sdtune import load_base, generate, add_embedding
    base = load_base("tiny")
    base.loras.add("style", "style.safetensors", weight=0.5)
    add_embedding(base, "concept.safetensors")
    images = generate(base, "a photo of <concept>", seed=1)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

from . import sources
from .console import note
from .generate import Generated, check_text
from .generate import generate as _generate
from .lora import blocks as block_weights
from .lora.hashes import lora_hashes_field, ti_hashes_field
from .models import Base, load_base
from .safeio import SdtuneError
from .ti.formats import a1111_word, load_embedding
from .ti.tokens import TokenTaken, find_in_prompt

# A1111 reads lyco: as lora: (lora_script); its network names are case-sensitive (<LORA:x> is an unknown network)
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)((?::[^:>]*)*)>")
# A1111's composable AND, which sdtune reads as a word (prompt editing and alternation are read: prompts.schedule)
UNREAD_SYNTAX = re.compile(r"\bAND\b")
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tags, all taken out of the prompt


class LoraTag(NamedTuple):
    name: str
    weight: float
    te_weight: float | None
    blocks: str | None  # the lbw= value (block weights or a preset name), None without one
    te2_weight: float | None = None  # SDXL's second text encoder where it has a weight of its own (te2=)


def lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """A1111 prompt syntax: strip ``<lora:name:w>`` / ``<lora:name:te_w:unet_w>`` tags (or A1111's named
    ``te=``/``unet=``, read as ``sources.a1111_weights`` says), with the lora-block-weight extension's
    ``:lbw=…`` (``<lora:name:1:lbw=INALL>``), and return them. ``te2=W`` gives SDXL's second text encoder a weight
    of its own (sdtune writes it where one was given; A1111 ignores a named value it does not know)."""
    tags = []
    for m in LORA_TAG.finditer(prompt):
        numbers, named, lbw = [], {}, None
        for item in m.group(2).split(":")[1:]:
            key, eq, value = item.partition("=")
            if item.startswith(block_weights.LBW):
                lbw = item[len(block_weights.LBW):]
            elif eq and key.strip() in ("unet", "te", "te2"):
                named[key.strip()] = value
            elif eq and key.strip() == "dyn":
                numbers += ["", "", value]  # said below, as the third number is
            elif eq:
                raise SdtuneError(f"{m.group(0)}: unknown option {key!r}; a tag takes up to two weights (or unet= "
                                  f"and te=) and lbw=BLOCK_WEIGHTS, e.g. <lora:{m.group(1)}:0.8:lbw=INALL>")
            else:
                numbers.append(item)
        if len(numbers) > 2:  # A1111's third is dyn (a lower rank for the file's dynamic-rank layers)
            raise SdtuneError(f"{m.group(0)}: a tag takes at most two weights (the text encoders', the UNet's); "
                              f"A1111's third, dyn, is not read by sdtune: leave it out")
        try:
            w, te = sources.a1111_weights([n for n in numbers if n], {k: v for k, v in named.items() if v})
            te2 = float(named["te2"]) if named.get("te2") else None
            if te2 is not None and not math.isfinite(te2):
                raise ValueError
        except ValueError:
            raise SdtuneError(f"{m.group(0)}: the weight must be a finite number, e.g. <lora:{m.group(1)}:0.8>") \
                from None
        tags.append(LoraTag(m.group(1), w, te, lbw, te2))

    # only the tags go, as A1111's parse_prompt takes them out: "a castle, <lora:x:1>" encodes "a castle, "
    clean = LORA_TAG.sub("", prompt)

    def other(m: re.Match) -> str:  # a broken LoRA tag stays, for generate's warning
        if m.group(1) in ("lora", "lyco"):
            return m.group(0)
        if m.group(1).lower() in ("lora", "lyco"):
            note(f"{m.group(0)} in the prompt: A1111 reads only <{m.group(1).lower()}:…> in lower case and leaves "
                 f"this tag out, so sdtune does too; write <{m.group(1).lower()}:{m.group(2)}>")
            return ""
        note(f"{m.group(0)} in the prompt: sdtune has no {m.group(1)} networks; the tag is left out, as A1111 "
             f"leaves out a network it lacks")
        return ""
    return EXTRA_NETWORK.sub(other, clean), tags


def combined_tags(tags: list[LoraTag]) -> list[LoraTag]:
    """One tag per LoRA name: a LoRA named twice (typed in the prompt and picked on the page, say) applies once at
    the sum of its weights, as two loaders of one file chained in ComfyUI do; its block weights must agree."""
    out: dict[str, LoraTag] = {}
    for tag in tags:
        first = out.get(tag.name)
        if first is None:
            out[tag.name] = tag
            continue
        if first.blocks != tag.blocks:
            raise SdtuneError(f"<lora:{tag.name}:…> appears twice with different block weights (lbw={first.blocks} "
                              f"and lbw={tag.blocks}); write it once")
        te = None if first.te_weight is None and tag.te_weight is None else (
            (first.weight if first.te_weight is None else first.te_weight)
            + (tag.weight if tag.te_weight is None else tag.te_weight))
        te2 = None if first.te2_weight is None and tag.te2_weight is None else sum(
            t.te2_weight if t.te2_weight is not None else (t.weight if t.te_weight is None else t.te_weight)
            for t in (first, tag))
        out[tag.name] = LoraTag(tag.name, first.weight + tag.weight, te, tag.blocks, te2)
    return list(out.values())


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float | None]]]:
    """``lora_tags`` as (name, weight, te_weight) triples, without the block weights."""
    clean, tags = lora_tags(prompt)
    return clean, [(t.name, t.weight, t.te_weight) for t in tags]


def add_lora(base: Base, spec: str, *, weight: float | None = None, name: str | None = None,
             search_dirs: tuple = (), allow_partial: bool = False, blocks=None) -> str:
    """Load a LoRA from 'SOURCE[:WEIGHT][:lbw=BLOCK_WEIGHTS]' (file, lora-dir name or hub source) under a name;
    returns the name. ``blocks`` (a preset name, "1,0,…" or numbers) overrides the spec's ``lbw=``."""
    spec, lbw = block_weights.split_spec(str(spec))  # a Path too, as loras.add takes one
    src, w = sources.parse_weighted(spec)
    if isinstance(w, tuple) and len(w) == 3 and "text_encoder_2" not in base.loras.modules:
        raise SdtuneError(f"{spec}: te2= weighs SDXL's second text encoder, and this model has one text encoder; "
                          f"leave te2= out")
    path = sources.resolve(src, "lora", tuple(search_dirs))
    name = name or Path(path).stem
    base.loras.add(name, path, weight if weight is not None else w, allow_partial=allow_partial,
                   blocks=blocks if blocks is not None else lbw)
    if weight is None and isinstance(w, tuple) and len(w) == 3:
        _note_idle_te2(base, name, spec)
    return name


def _note_idle_te2(base: Base, name: str, given: str) -> None:
    """A te2= weight on a LoRA with no layer in SDXL's second text encoder weighs nothing: said, not ignored."""
    if not next(r for r in base.loras.list() if r["name"] == name)["te2_layers"]:
        note(f"{given}: te2= changes nothing, this LoRA has no layers in SDXL's second text encoder")


def add_embedding(base: Base, spec: str, *, search_dirs: tuple = ()) -> list[str]:
    """Load a TI embedding from 'SOURCE[:TOKEN]'; returns the registered token(s)."""
    src, token = sources.split_suffix(str(spec))
    path = sources.resolve(src, "embedding", tuple(search_dirs))
    emb = load_embedding(path, token=token)
    added = base.embeddings.add(emb)
    word = a1111_word(emb, path)
    if token is None and word:
        note(f"{path}: loads as {emb.token!r}, the name it stores (diffusers' rule); A1111 and ComfyUI use its file "
             f"name {word!r}: give {path}:{word} to type that")
    return added


def _add_or_skip(load) -> None:
    """One odd embedding (an unknown layout, another model's width, a clashing token) must not stop the
    others from loading, as in A1111: it is named in a warning and left out."""
    try:
        load()
    except SdtuneError as e:
        note(f"{e} (skipped)")


def add_embeddings(base: Base, specs, *, search_dirs: tuple = (), skip_unusable: bool = True) -> list[str]:
    """Load several 'SOURCE[:TOKEN]' embeddings; a file that cannot be used is skipped with a warning, or with
    ``skip_unusable=False`` stops here as a missing file (a typo) always does. Returns the tokens loaded."""
    for spec in specs:  # check every path first, so that a typo costs no loading
        sources.resolve(sources.split_suffix(spec)[0], "embedding", tuple(search_dirs))
    before = set(base.embeddings.tokens)
    for spec in specs:
        if skip_unusable:
            _add_or_skip(lambda spec=spec: add_embedding(base, spec, search_dirs=tuple(search_dirs)))
        else:
            add_embedding(base, spec, search_dirs=tuple(search_dirs))
    return [t for t in base.embeddings.tokens if t not in before]


def load(model: str = "tiny", device=None, dtype=None, *, vae=None, loras=(), embeddings=(), lora_dirs=(),
         embedding_dirs=(), allow_partial: bool = False) -> Base:
    """The base model with its adapters loaded; ``vae``: a VAE file or folder to decode with instead of its own."""
    for folder in lora_dirs:  # as --embedding-dir is: a mistyped folder is said now, not at the first <lora:> tag
        if not Path(folder).is_dir():
            raise SdtuneError(f"{folder}: --lora-dir is not a folder; check the path")
    base = load_base(model, device=device, dtype=dtype, vae=vae)
    # named one by one, so one that cannot be used stops here rather than draw images without it
    base.given_words = tuple(add_embeddings(base, embeddings, search_dirs=tuple(embedding_dirs),
                                            skip_unusable=False))
    given: dict[str, str] = {}
    for spec in loras:
        once_by_name(given, add_lora(base, spec, search_dirs=tuple(lora_dirs), allow_partial=allow_partial), spec)
    base.embedding_dirs = tuple(embedding_dirs)
    return base


def note_unused_words(base: Base, *prompts: str) -> None:
    """An embedding ``load`` was given whose word no prompt types changes nothing: said, as a renamed file loads
    under the word it stores (an SD 1.x diffusers file too), which may not be the one typed."""
    for token in getattr(base, "given_words", ()):
        if not any(token in p for p in prompts if p):
            note(f"{base.embeddings.source(token)}: loaded as {token!r}, which no prompt types, so it changes "
                 f"nothing; type {token}, or give FILE:WORD to load it as another word")


def once_by_name(given: dict[str, str], name: str, spec: str) -> None:
    """Record ``--lora spec``, loaded as ``name``, in ``given``. One of a name given already (the same file
    twice, or two files of one name) is refused: the later one replaced the first (``LoraSet`` keeps one adapter
    a name), and prompt tags and PNGs name a LoRA by its file name."""
    if name in given:
        raise SdtuneError(f"--lora {spec}: a LoRA named {name} is given already (--lora {given[name]}); give each "
                          f"file once, with the weight it should have, and rename one of two files of one name "
                          f"(prompt tags and PNGs name a LoRA by its file name)")
    given[name] = spec


def _load_dir_embeddings(base: Base, prompt: str, dirs) -> None:
    """A1111 behaviour: an embedding file's name used as a word in the prompt loads that embedding. A file changed
    or deleted since it was loaded (a long-lived UI, a folder being edited) is loaded again or unloaded, as A1111
    rescans its folder, so the rows used are the file's and the PNG's hash names them."""
    loaded = base.__dict__.setdefault("dir_embeddings", {})  # token -> (file, its mtime and size when loaded)
    for name, (path, stamp) in list(loaded.items()):
        if name in base.embeddings and _stamp(path) != stamp:
            base.embeddings.remove(name)
        if name not in base.embeddings:
            del loaded[name]
    for d in dirs:
        for name, path in find_in_prompt(d, prompt).items():
            if name not in base.embeddings and load_folder_word(base.embeddings, name, path):
                loaded[name] = (path, _stamp(path))


def load_folder_word(embeddings, name: str, path: Path) -> bool:
    """Add a folder's embedding to ``embeddings`` (an ``EmbeddingSet``) under the word a prompt names it by (its
    file's stem); one that cannot be used is skipped with a note, as A1111 goes on without it: False."""
    try:
        embeddings.add(load_embedding(path, token=name))
        return True
    except TokenTaken as e:  # a prompt names a folder's embedding by its file name: that is what to change
        note(f"{e} (skipped; in a folder, rename the file to a word of its own)")
    except SdtuneError as e:  # another model's, unreadable...: the others still load
        note(f"{e} (skipped)")
    return False


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:  # deleted
        return None
    return st.st_mtime_ns, st.st_size


def _weights_text(row: dict) -> str:
    """A LoRA's strengths for the infotext, in a prompt tag's order: ``name=w``, or ``name=te:unet`` where the
    text encoders' weight differs, then ``:lbw=…`` (every block, in the layout's order) with block weights, so
    that a --lora given on the command line is reproducible from the PNG as a prompt tag is."""
    unet, te, name = row["unet_weight"], row["te_weight"], _prompt_name(row)
    text = f"{name}={unet:g}" if te == unet else f"{name}={te:g}:{unet:g}"
    if row["te2_weight"] != te and row["te2_layers"]:  # SDXL's second encoder at a weight of its own
        text += f":te2={row['te2_weight']:g}"
    if row["blocks"] is not None:
        text += f":lbw={','.join(f'{w:g}' for w in row['blocks'].values())}"
    return text


def _tags_of_loaded(base: Base) -> str:
    """Prompt tags for the LoRAs loaded apart from the prompt (--lora, the UI's picks, a grid's cells), which A1111's
    "Send to txt2img" would otherwise drop: `` <lora:name:w>`` each, with a space and no comma (A1111 cuts the tag
    only, and a comma left behind would be a token more). A LoRA held at weight 0 drew nothing and gets none."""
    rows = [r for r in base.loras.list() if not r["name"].startswith("<lora:")
            and any(r[k] for k in ("unet_weight", "te_weight", "te2_weight"))]
    return "".join(" <lora:" + _weights_text(r).replace("=", ":", 1) + ">" for r in rows)


def _used_embeddings(base: Base, text: str) -> list[tuple[str, str]]:
    """(token, source) of each loaded embedding the text names: as the tokenizer finds a token, a word of its own
    in any case."""
    embeddings = getattr(base, "embeddings", None)
    return [(t, embeddings.source(t)) for t in (embeddings.tokens if embeddings else [])
            if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text, re.IGNORECASE)]


def _tag_source(name: str, dirs: tuple) -> Path:
    """The file of a prompt's ``<lora:NAME:…>``: a name in the LoRA folders (A1111's only form), or a path/hub id."""
    try:
        return sources.resolve(name, "lora", dirs)
    except SdtuneError:
        if "/" in name or Path(name).suffix:  # meant as a path or a hub id: its own message says more
            raise
        where = f"in {', '.join(map(str, dirs))}" if dirs else "(no LoRA folder given)"
        raise SdtuneError(f"<lora:{name}:…> in the prompt: no LoRA named {name!r} {where}; check the name, or "
                          f"pass the folder that holds {name}.safetensors with --lora-dir") from None


def _prompt_name(row: dict) -> str:
    """The name a prompt tag finds a loaded LoRA by: the tag's own, else its file's stem (A1111 names LoRAs by
    their files: one added from a file under another name would not be found again), else the name it has."""
    name = row["name"]
    if name.startswith("<lora:") and name.endswith(">"):
        return name[len("<lora:"):-1]
    source = Path(row["source"]) if row["source"] else None
    return source.stem if source is not None and source.suffix and source.is_file() else name


def generate(base: Base, prompt: str, *, lora_dirs=(), embedding_dirs=None, allow_partial: bool = False,
             on_batch=None, **kwargs) -> list[Generated]:
    """Generate with the adapters on ``base``, plus ``<lora:name:w>`` tags in the prompt (``<lora:name:w:lbw=…>``
    with block weights; applied for this call only, looked up in ``lora_dirs``) and embedding names from
    ``embedding_dirs``. ``on_batch(images)``: each batch's finished images, their infotext final (to save them as
    they come: ``generate.ImageWriter.add``)."""
    if kwargs.get("negative_prompt", "") is None:  # diffusers' default for none
        kwargs["negative_prompt"] = ""
    check_text("prompt", prompt)  # before the tags are read from it
    clean, tags = lora_tags(prompt)
    tags = combined_tags(tags)
    unread = UNREAD_SYNTAX.search(clean + "\n" + kwargs.get("negative_prompt", ""))
    if unread:
        note("'AND' in the prompt: sdtune does not read A1111's composable AND (a prompt per part, their "
             "predictions mixed); the word is encoded as written")
    broken = re.search(r"<(lora|lyco):[^>]*(>|$)", clean, re.I)  # (<LORA:x> complete: said by lora_tags)
    if broken:  # unclosed, or no name: A1111 reads it as words too, but the user meant a LoRA
        note(f"{broken.group(0)!r} in the prompt is not a LoRA tag, so no LoRA is applied for it; write "
             f"<lora:NAME:WEIGHT>")
    dirs = embedding_dirs if embedding_dirs is not None else getattr(base, "embedding_dirs", ())
    _load_dir_embeddings(base, clean + " " + kwargs.get("negative_prompt", ""), dirs)
    added = []
    try:
        for tag in tags:
            name = f"<lora:{tag.name}>"
            apart = next((r for r in base.loras.list() if not r["name"].startswith("<lora:")  # --lora, a pick
                          and _prompt_name(r) == tag.name), None)
            if apart is not None and apart["blocks"] != (None if tag.blocks is None else
                                                         block_weights.parse(tag.blocks, base.family)):
                # the image's prompt would name it twice with both, which combined_tags refuses on a redraw
                raise SdtuneError(f"<lora:{tag.name}:…> in the prompt and the LoRA {tag.name} given apart from it "
                                  f"have different block weights; give it once")
            path = _tag_source(tag.name, tuple(lora_dirs))
            own_te2 = tag.te2_weight is not None and "text_encoder_2" in base.loras.modules  # else: no such encoder
            weight = tag.weight if not own_te2 else {
                "unet": tag.weight, "text_encoder": tag.weight if tag.te_weight is None else tag.te_weight,
                "text_encoder_2": tag.te2_weight}
            base.loras.add(name, path, weight, te_weight=None if own_te2 else tag.te_weight,
                           allow_partial=allow_partial,
                           blocks=tag.blocks)
            added.append(name)
            if own_te2:
                _note_idle_te2(base, name, f"<lora:{tag.name}:...:te2=...>")
        info = {}
        if len(base.loras):
            info["Lora weights"] = "; ".join(_weights_text(r) for r in base.loras.list())
            # A1111's field, by which civitai links the image to the LoRA pages (tags named as in the prompt); a
            # LoRA held at weight 0 (a grid's base cell) drew nothing and is not credited
            info["Lora hashes"] = lora_hashes_field([(_prompt_name(r), r["source"]) for r in base.loras.list()
                                                     if any(r[k] for k in ("unet_weight", "te_weight", "te2_weight"))])
        used = _used_embeddings(base, clean + "\n" + kwargs.get("negative_prompt", ""))
        if used:  # A1111's field for the embeddings a prompt used, by which civitai links them too
            info["TI hashes"] = ti_hashes_field(used)
        extra = {**info, **kwargs.pop("extra_info", {})}
        saved = prompt + _tags_of_loaded(base)

        def finished(batch: list[Generated]) -> None:
            if saved != clean:  # keep the tags in the saved prompt, as A1111 does, so the PNG reproduces the image
                for r in batch:
                    r.infotext = r.infotext.replace(clean, saved, 1)
            if on_batch is not None:
                on_batch(batch)
        return _generate(base, clean, extra_info=extra, on_batch=finished, **kwargs)
    finally:
        for name in added:
            base.loras.remove(name)
