"""Pivotal tuning: a new word trained with a LoRA, bundled in the LoRA file (A1111's ``bundle_emb`` layout) and
beside it, loaded and unloaded with the LoRA; diffusers still loads the LoRA part."""

import copy
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.lora import formats
from sdtune.lora.bake import merge
from sdtune.lora.neutral import Adapter, Lora
from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import load_embedding
from sdtune.tiny import world
from sdtune.train.config import LoraSettings
from sdtune.train.lora import train_lora

TOKEN = "<pv>"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pivotal")
    world.write_dataset(folder, world.concept_scenes(4, seed=3, style="outline"), template=None, with_style=False)
    for caption in folder.glob("*.txt"):
        caption.write_text(f"a photo of {TOKEN}, " + caption.read_text())
    return folder


@pytest.fixture(scope="module")
def run(base, dataset, tmp_path_factory):
    """A 3-step pivotal run, saved every step; the word trains for the first step only."""
    out = tmp_path_factory.mktemp("pivotal-out")
    init_table = base.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab = dict(base.tokenizer.get_vocab())
    s = LoraSettings(data=str(dataset), out=str(out), steps=3, save_every=1, batch_size=2, rank=4, alpha=2, lr=5e-3,
                     progress=False, report=False, ti_token=TOKEN, ti_init="red square", ti_vectors=2, ti_lr=5e-2,
                     ti_steps=1, formats=["kohya", "diffusers"])
    path = train_lora(base, s)
    return out, path, init_table, vocab


def _bundle(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("bundle_emb.")}


def test_bundle_round_trips_in_a1111_layout(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    lora = Lora()
    lora.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = Adapter(
        "lora", {"down": torch.randn(2, 32, generator=g), "up": torch.randn(32, 2, generator=g)}, 1.0)
    rows = torch.randn(2, 64, generator=g)
    formats.bundle(lora, "<a>", {"": rows})
    xl_l, xl_g = torch.randn(3, 768, generator=g), torch.randn(3, 1280, generator=g)
    formats.bundle(lora, "<b>", {"clip_l": xl_l, "clip_g": xl_g})
    formats.save_lora(lora, tmp_path / "x.safetensors")
    # the keys A1111's Lora extension reads (networks.py: bundle_emb.<name>.string_to_param.* or .clip_l/.clip_g)
    assert set(_bundle(tmp_path / "x.safetensors")) == {"bundle_emb.<a>.string_to_param.*", "bundle_emb.<b>.clip_l",
                                                        "bundle_emb.<b>.clip_g"}
    back = formats.load_lora(tmp_path / "x.safetensors")
    embs = {e.token: e for e in formats.bundled_embeddings(back)}
    assert set(embs) == {"<a>", "<b>"}
    assert torch.equal(embs["<a>"].vectors, rows)
    assert torch.equal(embs["<b>"].vectors["clip_l"], xl_l) and torch.equal(embs["<b>"].vectors["clip_g"], xl_g)
    # inspect names each word once, an SDXL word with its two encoders' rows
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 0
    assert re.search(r"\nembeddings +<a> \(2, 64\), <b> clip_l \(3, 768\) \+ clip_g \(3, 1280\)\n",
                     capsys.readouterr().out)
    with pytest.raises(SdtuneError, match="without dots"):
        formats.bundle(lora, "a.b", {"": rows})


def test_the_run_writes_the_word_inside_and_beside_each_lora_file(base, run):
    out, path, init_table, _ = run
    stored = _bundle(path)
    assert list(stored) == [f"bundle_emb.{TOKEN}.string_to_param.*"]
    alone = load_embedding(out / "pv.safetensors")
    assert alone.token == TOKEN and torch.equal(alone.vectors, stored[f"bundle_emb.{TOKEN}.string_to_param.*"])
    # it learned (it started from the two tokens of "red square") ...
    start = init_table[base.tokenizer.encode("red square", add_special_tokens=False)]
    assert alone.vectors.shape == (2, 64) and not torch.allclose(alone.vectors, start)
    # ... for --ti-steps 1 only: the step-1 snapshot's word is the final one, while the LoRA went on changing
    step1 = _bundle(out / "lora-step000001.safetensors")[f"bundle_emb.{TOKEN}.string_to_param.*"]
    assert torch.equal(step1, alone.vectors)
    assert torch.equal(load_embedding(out / "pv-step000001.safetensors").vectors, step1)
    a = formats.load_lora(out / "lora-step000001.safetensors")
    b = formats.load_lora(path)
    assert any(not torch.equal(ad.tensors["up"], b.modules[c][p].tensors["up"]) for c, p, ad in a.items())


def test_training_leaves_the_base_as_it_was(base, run):
    _, _, init_table, vocab = run
    assert TOKEN not in base.embeddings and base.tokenizer.get_vocab() == vocab
    assert torch.equal(base.text_encoder.get_input_embeddings().weight, init_table)


def test_loading_the_lora_loads_the_word_and_unloading_restores_exactly(base, run):
    _, path, init_table, vocab = run
    prompt = f"a photo of {TOKEN}"
    before = base.tokenizer(prompt).input_ids
    word = load_embedding(run[0] / "pv.safetensors").vectors
    base.loras.add("piv", path, 0.7)
    try:
        assert TOKEN in base.embeddings and base.embeddings.expand(prompt) == f"a photo of {TOKEN} {TOKEN}_1"
        ids = base.embeddings.ids(TOKEN)
        assert torch.equal(base.text_encoder.get_input_embeddings().weight[ids], word)
    finally:
        base.loras.remove("piv")
    assert TOKEN not in base.embeddings
    assert base.tokenizer.get_vocab() == vocab and base.tokenizer(prompt).input_ids == before
    table = base.text_encoder.get_input_embeddings()
    assert table.weight.shape == init_table.shape and torch.equal(table.weight, init_table)
    assert base.text_encoder.config.vocab_size == init_table.shape[0]


def test_a_word_already_loaded_is_kept_and_not_unloaded_by_the_lora(base, run):
    out, path, _, _ = run
    base.embeddings.add(load_embedding(out / "pv.safetensors"))
    try:
        with pytest.warns(UserWarning, match="already loaded"):
            base.loras.add("piv", path)
        base.loras.remove("piv")
        assert TOKEN in base.embeddings
    finally:
        base.embeddings.remove(TOKEN)


def _without_text_encoder_note(said: str) -> str:
    # the run trained no text-encoder LoRA, which diffusers mentions in a line of its own
    return re.sub(r"No LoRA keys associated to CLIPTextModel[^\n]*", "", said)


def _pipe(base):
    return StableDiffusionPipeline(vae=base.vae, text_encoder=copy.deepcopy(base.text_encoder),
                                   tokenizer=copy.deepcopy(base.tokenizer), unet=copy.deepcopy(base.unet),
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_diffusers_loads_the_lora_part_and_the_word_beside_it(base, run, diffusers_says):
    out, path, _, _ = run
    lora = formats.load_lora(path)
    # the kohya file without its bundle: diffusers' kohya converter takes every key
    pipe = _pipe(base)
    lora_part = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")}
    said = _without_text_encoder_note(diffusers_says(lambda: pipe.load_lora_weights(lora_part, adapter_name="pivotal")))
    assert not re.search(r"unexpected|did not match|missing|not been correctly", said, re.IGNORECASE), said[-2000:]
    wrapped = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(lora.modules["unet"])
    # the diffusers-layout file and the word on its own (diffusers' pivotal-tuning pair)
    pipe = _pipe(base)
    said = _without_text_encoder_note(diffusers_says(
        lambda: pipe.load_lora_weights(str(out / "diffusers"), adapter_name="pivotal")))
    assert not re.search(r"unexpected|did not match|missing", said, re.IGNORECASE), said[-2000:]
    assert {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")} == set(lora.modules["unet"])
    pipe.load_textual_inversion(str(out / "pv.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    word = load_embedding(out / "pv.safetensors").vectors
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), word)


def test_convert_to_diffusers_writes_the_word_beside_the_lora(base, run, diffusers_says, tmp_path, capsys):
    """diffusers' loader refuses a LoRA file with the word inside; convert --to diffusers splits them in two."""
    out, path, _, _ = run
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        _pipe(base).load_lora_weights(str(path), adapter_name="whole")
    conv = tmp_path / "conv"
    assert main(["convert", str(path), str(conv / "lora.safetensors"), "--to", "diffusers"]) == 0
    assert capsys.readouterr().out.strip().endswith(
        f"; its word {TOKEN} in {conv / 'pv.safetensors'} (diffusers loads it with load_textual_inversion)")
    assert sorted(p.name for p in conv.iterdir()) == ["lora.safetensors", "pv.safetensors"]
    pipe = _pipe(base)
    said = _without_text_encoder_note(diffusers_says(
        lambda: pipe.load_lora_weights(str(conv / "lora.safetensors"), adapter_name="pivotal")))
    assert not re.search(r"unexpected|did not match|missing", said, re.IGNORECASE), said[-2000:]
    assert {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")} == set(formats.load_lora(path).modules["unet"])
    pipe.load_textual_inversion(str(conv / "pv.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(),
                       load_embedding(out / "pv.safetensors").vectors)
    # into the run's own folder: its pv.safetensors holds the same word and is kept as it is
    kept = (out / "pv.safetensors").read_bytes()
    assert main(["convert", str(path), str(out / "as-diffusers.safetensors"), "--to", "diffusers"]) == 0
    assert (out / "pv.safetensors").read_bytes() == kept
    other = tmp_path / "other"  # another file by that name is not written over
    other.mkdir()
    (other / "pv.safetensors").write_bytes(b"mine")
    assert main(["convert", str(path), str(other / "lora.safetensors"), "--to", "diffusers"]) == 2
    assert (f"pv.safetensors: exists and is not the word {TOKEN} of {path}, which the diffusers layout keeps in "
            f"its own file there; move that file, or convert into another folder") in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["pv.safetensors"]


def test_a_merge_bakes_the_layers_and_leaves_the_word_out(base, run, tmp_path, capsys):
    """A checkpoint has no tokenizer to hold a new word (a grown token table loads nowhere): every merge path
    (a loaded model, a single file streamed) keeps the base's table and says where the word is."""
    _, path, _, _ = run
    rows = base.text_encoder.get_input_embeddings().weight.shape[0]

    def table_rows(file):
        with safe_open(str(file), "pt") as f:
            return next(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("token_embedding.weight"))

    said = (f"{path}: its bundled word(s) {TOKEN} are not baked in (a merged model keeps the base's vocabulary); "
            f"load each beside it as an embedding: `sdtune convert {path} OUT --to diffusers` writes them apart")
    first, second = tmp_path / "m.safetensors", tmp_path / "m2.safetensors"
    for model, out in (("tiny-random", first), (first, second)):  # loaded and patched; streamed
        with pytest.warns(UserWarning) as notes:
            assert main(["merge", "--model", str(model), "--lora", str(path), "--out", str(out)]) == 0
        assert [str(n.message) for n in notes] == [said]
        assert table_rows(out) == rows
    merge(base, [(path, 1.0)], tmp_path / "folder")  # a loaded Base: the word is not left in it either
    assert TOKEN not in base.embeddings and base.text_encoder.get_input_embeddings().weight.shape[0] == rows


def test_cli_pivotal_run_writes_both_files(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--rank", "2", "--sample-every", "0", "--no-report", "--no-progress",
                 "--ti-token", TOKEN, "--ti-init", "square", "--ti-lr", "0.01"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "lora.safetensors")
    word = load_embedding(out / "pv.safetensors")
    assert word.vectors.shape == (1, 64)
    assert torch.equal(_bundle(out / "lora.safetensors")[f"bundle_emb.{TOKEN}.string_to_param.*"], word.vectors)
    assert 'ti_token = "<pv>"' in (out / "settings.toml").read_text()


def test_captions_without_the_word_are_refused(base, tmp_path):
    data = tmp_path / "data"
    world.write_dataset(data, world.concept_scenes(1, seed=3))
    vocab = dict(base.tokenizer.get_vocab())
    with pytest.raises(SdtuneError, match=r"no caption mentions <pv>; put --ti-token <pv> in the captions"):
        train_lora(base, LoraSettings(data=str(data), out=str(tmp_path / "o"), steps=1, progress=False,
                                      ti_token=TOKEN, ti_init="square"))
    assert base.tokenizer.get_vocab() == vocab  # nothing was added


def test_pivotal_settings_are_checked():
    base_kw = dict(data="d", out="o")
    with pytest.raises(SdtuneError, match="--ti-token needs --ti-init"):
        LoraSettings(**base_kw, ti_token=TOKEN).check()
    with pytest.raises(SdtuneError, match="--ti-init without --ti-token"):
        LoraSettings(**base_kw, ti_init="dog").check()
    with pytest.raises(SdtuneError, match="one word without spaces or dots"):
        LoraSettings(**base_kw, ti_token="my.dog", ti_init="dog").check()
    with pytest.raises(SdtuneError, match="--ti-steps -1"):
        LoraSettings(**base_kw, ti_token=TOKEN, ti_init="dog", ti_steps=-1).check()
    # without a word too: settings.toml would keep a count no run can use, refused only at a resume with a word
    with pytest.raises(SdtuneError, match="--ti-vectors 0: must be from 1 to 75"):
        LoraSettings(**base_kw, ti_vectors=0).check()
    with pytest.raises(SdtuneError, match="--ti-lr -1.0: must be 0 or more"):
        LoraSettings(**base_kw, ti_lr=-1.0).check()


def test_a_resumed_pivotal_run_repeats_the_uninterrupted_one(base, dataset, tmp_path):
    def run_to(out, steps):
        return train_lora(base, LoraSettings(data=str(dataset), out=str(out), steps=steps, save_every=1, batch_size=2,
                                             rank=2, lr=5e-3, progress=False, report=False, ti_token=TOKEN,
                                             ti_init="square", ti_lr=5e-2))

    whole = run_to(tmp_path / "whole", 3)
    run_to(tmp_path / "split", 2)
    resumed = run_to(tmp_path / "split", 3)  # from the step-2 state: the word's rows and the LoRA's
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert set(a) == set(b) and f"bundle_emb.{TOKEN}.string_to_param.*" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_an_sdxl_bundle_loads_into_both_text_encoders_and_unloads_exactly(tmp_path):
    xl = load_base("sdxl-small-random")
    encoders = xl.text_encoders()
    tables = {te.embedding_key: m.get_input_embeddings().weight.detach().clone() for te, m, _ in encoders}
    vocabs = {te.embedding_key: dict(tok.get_vocab()) for te, _, tok in encoders}
    g = torch.Generator().manual_seed(2)
    rows = {key: torch.randn(2, t.shape[1], generator=g) for key, t in tables.items()}
    lora = Lora()
    formats.bundle(lora, "<xl>", rows)
    formats.save_lora(lora, tmp_path / "xl.safetensors")
    assert set(_bundle(tmp_path / "xl.safetensors")) == {"bundle_emb.<xl>.clip_l", "bundle_emb.<xl>.clip_g"}
    xl.loras.add("xl", tmp_path / "xl.safetensors")
    try:
        for te, model, tok in encoders:
            ids = tok.convert_tokens_to_ids(["<xl>", "<xl>_1"])
            assert torch.equal(model.get_input_embeddings().weight[ids].detach(), rows[te.embedding_key])
    finally:
        xl.loras.remove("xl")
    for te, model, tok in encoders:
        assert tok.get_vocab() == vocabs[te.embedding_key]
        assert torch.equal(model.get_input_embeddings().weight, tables[te.embedding_key])
