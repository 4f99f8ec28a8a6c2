"""Embeddings for SDXL (both text encoders) and SD 2.x (1024 wide), with diffusers as the oracle.

diffusers has no SDXL embedding loader of its own: its documented way is ``load_textual_inversion`` once per
encoder, ``clip_l`` rows into text_encoder/tokenizer and ``clip_g`` rows into text_encoder_2/tokenizer_2. sdtune
must give the same token ids and table rows in both, and unload both back bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from test_ti_tokens import snapshot
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune import families, load_base
from sdtune.models import tokenizer_for
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import Embedding, load_embedding, save_embedding
from sdtune.ti.tokens import EmbeddingSet
from sdtune.tiny.model import build

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ti"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real embedding fixtures not found at {FIXTURES}")
# real SDXL files -> the file's keys for clip_l and clip_g (what a diffusers user passes to each encoder)
XL_FIXTURES = {"Kaleidia__SDXL-Detail.safetensors": ("clip_l", "clip_g"),
               "HK200202_emojii__embeddings.pti": ("text_encoders_0", "text_encoders_1"),
               "roettger_XLTI__myPuppet768.pt": ("emb", "emb2")}
NFIXER = FIXTURES / "monsterhunters__nfixer.pt"
PROMPTS = ["a photo of <one> on a table", "<three> and <three>, again <three>", "plain words only"]


@pytest.fixture(scope="module")
def pristine_xl():
    return load_base("sdxl-small-random", device="cpu", dtype="fp32")


@pytest.fixture
def xl(pristine_xl):
    """A Base sharing the UNet and VAE, with its own copies of both text encoders and tokenizers."""
    return dataclasses.replace(pristine_xl, **{name: copy.deepcopy(getattr(pristine_xl, name)) for name in
                                               ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})


def xl_oracle(pristine_xl) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline on identical copies of the text side."""
    return StableDiffusionXLPipeline(vae=pristine_xl.vae, unet=pristine_xl.unet, scheduler=pristine_xl.scheduler,
                                     **{name: copy.deepcopy(getattr(pristine_xl, name)) for name in
                                        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})


def oracle_load(pipe, rows_by_token: dict[str, tuple]):
    """diffusers' documented SDXL recipe: each token's clip_l rows into the first encoder, its clip_g rows into the
    second (one call per encoder for all tokens: each call resizes the table, seconds at this size)."""
    tokens = list(rows_by_token)
    for i, (tokenizer, encoder) in enumerate(pairs(pipe)):
        pipe.load_textual_inversion([rows_by_token[t][i] for t in tokens], token=tokens, text_encoder=encoder,
                                    tokenizer=tokenizer)


def pairs(base):
    """(tokenizer, text encoder) of each SDXL encoder, in the order clip_l, clip_g."""
    return [(base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)]


def table(text_encoder):
    return text_encoder.get_input_embeddings().weight.detach()


def assert_same_tokens_and_rows(base, pipe):
    for (tokenizer, encoder), (theirs, their_encoder) in zip(pairs(base), pairs(pipe)):
        assert tokenizer.get_added_vocab() == theirs.get_added_vocab()
        assert torch.equal(table(encoder), table(their_encoder))
        assert encoder.config.vocab_size == len(tokenizer) == len(theirs)


def xl_rows(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, 768, generator=gen), "clip_g": torch.randn(n, 1280, generator=gen)}


def write_xl(folder: Path) -> dict[str, dict]:
    """A 1-vector and a 3-vector SDXL embedding in the clip_l/clip_g layout: {token: rows}."""
    made = {"<one>": xl_rows(1, 1), "<three>": xl_rows(3, 2)}
    for token, rows in made.items():
        save_file(rows, folder / f"{token}.safetensors")
    return made


def test_sdxl_one_and_multi_vector_match_diffusers_per_encoder_and_unload_exactly(tmp_path, pristine_xl, xl):
    made = write_xl(tmp_path)
    before = [snapshot(tok, enc, PROMPTS) for tok, enc in pairs(xl)]
    weights = [table(enc).clone() for _, enc in pairs(xl)]
    backends = [tok._tokenizer for tok, _ in pairs(xl)]
    for token, rows in made.items():
        names = xl.embeddings.add(load_embedding(tmp_path / f"{token}.safetensors"))
        assert names == [token] + [f"{token}_{i}" for i in range(1, len(rows["clip_l"]))]
    pipe = xl_oracle(pristine_xl)
    oracle_load(pipe, {token: (rows["clip_l"], rows["clip_g"]) for token, rows in made.items()})
    assert_same_tokens_and_rows(xl, pipe)
    for token, rows in made.items():  # same ids in both tokenizers, each encoder holding its own rows there
        ids = xl.embeddings.ids(token)
        assert ids == xl.embeddings.ids(token, "clip_g")
        assert torch.equal(table(xl.text_encoder)[ids], rows["clip_l"])
        assert torch.equal(table(xl.text_encoder_2)[ids], rows["clip_g"])
    assert xl.embeddings.ids("<one>") == [49408] and xl.embeddings.ids("<three>") == [49409, 49410, 49411]

    # one expanded prompt for both tokenizers: what diffusers' per-tokenizer rewrite gives (lower-case tokens,
    # so that rewrite works and is the oracle)
    for prompt in PROMPTS:
        expanded = xl.embeddings.expand(prompt)
        for tokenizer, theirs in zip((xl.tokenizer, xl.tokenizer_2), (pipe.tokenizer, pipe.tokenizer_2)):
            assert tokenizer(expanded).input_ids == theirs(pipe.maybe_convert_prompt(prompt, theirs)).input_ids
    ids = xl.tokenizer(xl.embeddings.expand(PROMPTS[1])).input_ids
    assert ids == xl.tokenizer_2(xl.embeddings.expand(PROMPTS[1])).input_ids
    assert ids[1:4] == [49409, 49410, 49411] and ids.count(49411) == 3
    with torch.no_grad():  # each encoder looks up its own rows for the same ids
        batch = torch.tensor([ids])
        assert torch.equal(xl.text_encoder.get_input_embeddings()(batch)[0, 1:4], made["<three>"]["clip_l"])
        assert torch.equal(xl.text_encoder_2.get_input_embeddings()(batch)[0, 1:4], made["<three>"]["clip_g"])

    xl.embeddings.remove("<one>")  # the survivor moves down, as in diffusers' unload
    for tokenizer, encoder in pairs(pipe):
        pipe.unload_textual_inversion("<one>", tokenizer=tokenizer, text_encoder=encoder)
    assert_same_tokens_and_rows(xl, pipe)
    assert xl.embeddings.ids("<three>") == [49408, 49409, 49410]
    kept = xl.embeddings.get("<three>")
    assert kept.format == "sdxl" and all(torch.equal(kept.vectors[k], made["<three>"][k]) for k in kept.vectors)

    xl.embeddings.remove_all()
    for (tokenizer, encoder), snap, weight, backend in zip(pairs(xl), before, weights, backends):
        assert snapshot(tokenizer, encoder, PROMPTS) == snap
        assert torch.equal(table(encoder), weight)
        assert tokenizer._tokenizer is backend  # the very same backend object is back


def test_a_failure_in_the_second_encoder_leaves_both_as_they_were(tmp_path, xl, monkeypatch):
    made = write_xl(tmp_path)
    xl.embeddings.add(load_embedding(tmp_path / "<one>.safetensors"))
    before = [snapshot(tok, enc, PROMPTS) for tok, enc in pairs(xl)]
    weights = [table(enc).clone() for _, enc in pairs(xl)]

    def broken(names, rows):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(xl.embeddings._tables[1], "append", broken)  # the first encoder has its rows by then
    with pytest.raises(RuntimeError, match="out of memory"):
        xl.embeddings.add(Embedding("<three>", made["<three>"], "three", "sdxl"))
    for (tokenizer, encoder), snap, weight in zip(pairs(xl), before, weights):
        assert snapshot(tokenizer, encoder, PROMPTS) == snap and torch.equal(table(encoder), weight)
    assert xl.embeddings.tokens == ["<one>"]


def test_other_families_embeddings_are_refused_on_sdxl_in_one_line(xl):
    model = "SDXL (clip_l 768 and clip_g 1280 wide)"
    for width, family in ((768, "SD 1.x"), (1024, "SD 2.x"), (1280, "SDXL's text_encoder_2")):
        with pytest.raises(SdtuneError) as err:
            xl.embeddings.add(Embedding("<w>", torch.zeros(2, width), "w.pt", "a1111"))
        assert str(err.value) == (f"w.pt: embedding made for {family} ({width} wide), but this model is {model}; "
                                  f"use an embedding made for this model")
    assert len(xl.tokenizer) == len(xl.tokenizer_2) == 49408 and xl.embeddings.tokens == []


def test_get_saves_clip_l_clip_g_and_placeholder_fills_both(tmp_path, pristine_xl, xl):
    made = write_xl(tmp_path)
    xl.embeddings.add(load_embedding(tmp_path / "<three>.safetensors", token="<t>"))
    save_embedding(xl.embeddings.get("<t>"), tmp_path / "t.safetensors")
    state = load_file(tmp_path / "t.safetensors")
    assert sorted(state) == ["clip_g", "clip_l"] and all(torch.equal(state[k], made["<three>"][k]) for k in state)
    pipe = xl_oracle(pristine_xl)  # what a diffusers user does with the saved file
    oracle_load(pipe, {"<t>": (state["clip_l"], state["clip_g"])})
    assert_same_tokens_and_rows(xl, pipe)

    ids = xl.embeddings.add_placeholder("<p>", "dog", num_vectors=2)
    dog = xl.tokenizer.encode("dog", add_special_tokens=False)[0]
    assert ids == xl.embeddings.ids("<p>", "clip_g") == [49411, 49412]
    for _, encoder in pairs(xl):
        assert torch.equal(table(encoder)[ids], table(encoder)[[dog, dog]])


def test_base_embeddings_of_a_one_encoder_family_stay_plain():
    base = load_base("tiny-random")
    base.embeddings.add(Embedding("<tiny>", torch.ones(2, 64), "t.pt", "diffusers"))
    got = base.embeddings.get("<tiny>")
    assert isinstance(got.vectors, torch.Tensor) and torch.equal(got.vectors, torch.ones(2, 64))
    assert base.embeddings.tokenizer is base.tokenizer and base.embeddings.ids("<tiny>", "") == [49408, 49409]


@needs_fixtures
def test_real_sdxl_files_match_diffusers_and_unload(pristine_xl, xl):
    before = [snapshot(tok, enc, PROMPTS) for tok, enc in pairs(xl)]
    oracle_rows = {}
    for name, (key_l, key_g) in XL_FIXTURES.items():
        path = FIXTURES / name
        emb = load_embedding(path)
        xl.embeddings.add(emb)
        raw = load_file(path) if path.suffix != ".pt" else torch.load(path, map_location="cpu", weights_only=True)
        oracle_rows[emb.token] = (raw[key_l], raw[key_g])  # bf16 in the .pti and .pt: cast as diffusers does
    pipe = xl_oracle(pristine_xl)
    oracle_load(pipe, oracle_rows)
    assert_same_tokens_and_rows(xl, pipe)
    assert xl.embeddings.tokens == ["Kaleidia__SDXL-Detail", "HK200202_emojii__embeddings",
                                    "roettger_XLTI__myPuppet768"]
    prompt = "Kaleidia__SDXL-Detail, HK200202_emojii__embeddings roettger_XLTI__myPuppet768"
    for tokenizer, _ in pairs(xl):
        ids = tokenizer(xl.embeddings.expand(prompt)).input_ids
        assert ids == [49406, 49408, 49409, 267, 49410, 49411, 49412, 49407]  # every vector, in both tokenizers
    xl.embeddings.remove_all()
    assert [snapshot(tok, enc, PROMPTS) for tok, enc in pairs(xl)] == before


# ---- SD 2.x: one 1024-wide OpenCLIP text encoder ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sd2_parts():
    """A 1-layer CLIP text encoder as wide as SD 2.x's (1024) with SD 2.x's tokenizer, and a tiny UNet/VAE for
    the oracle pipeline (its constructor does not check widths)."""
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=256, num_hidden_layers=1,
                            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return tokenizer_for(families.SD2.text_encoders[0]), CLIPTextModel(config), build(seed=0)


def sd2_oracle(sd2_parts):
    tokenizer, text_encoder, tiny = sd2_parts
    return StableDiffusionPipeline(vae=tiny["vae"], unet=tiny["unet"], scheduler=tiny["scheduler"],
                                   text_encoder=copy.deepcopy(text_encoder), tokenizer=copy.deepcopy(tokenizer),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd2_files(tmp_path) -> list[tuple[Path, str | None]]:
    gen = torch.Generator().manual_seed(3)
    save_file({"<sd2-one>": torch.randn(1024, generator=gen)}, tmp_path / "one.safetensors")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(3, 1024, generator=gen)},
                "name": "sd2-three", "step": 5}, tmp_path / "three.pt")
    files = [(tmp_path / "one.safetensors", None), (tmp_path / "three.pt", None)]
    return files + ([(NFIXER, None)] if NFIXER.is_file() else [])


def test_sd2_embeddings_match_diffusers_and_unload_exactly(tmp_path, sd2_parts):
    tokenizer, text_encoder = copy.deepcopy(sd2_parts[0]), copy.deepcopy(sd2_parts[1])
    before, weight = snapshot(tokenizer, text_encoder, PROMPTS), table(text_encoder).clone()
    embeddings, pipe = EmbeddingSet(tokenizer, text_encoder), sd2_oracle(sd2_parts)
    files = sd2_files(tmp_path)
    for path, _ in files:
        embeddings.add(load_embedding(path))
    pipe.load_textual_inversion([str(p) for p, _ in files])
    assert tokenizer.get_added_vocab() == pipe.tokenizer.get_added_vocab()
    assert torch.equal(table(text_encoder), table(pipe.text_encoder))
    prompt = "sd2-three, <sd2-one> nfixer-271"
    assert tokenizer(embeddings.expand(prompt)).input_ids == pipe.tokenizer(
        pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids
    embeddings.remove_all()
    assert snapshot(tokenizer, text_encoder, PROMPTS) == before and torch.equal(table(text_encoder), weight)


@needs_fixtures
def test_real_sd2_file_reads_and_is_refused_elsewhere(sd2_parts):
    emb = load_embedding(NFIXER)
    assert (emb.token, emb.num_vectors, emb.width, emb.format) == ("nfixer-271", 15, 1024, "a1111")
    raw = torch.load(NFIXER, map_location="cpu", weights_only=True)
    assert type(raw["string_to_token"]["*"]) is int and torch.equal(emb.vectors, raw["string_to_param"]["*"])
    tiny = build(seed=0)
    with pytest.raises(SdtuneError) as err:
        EmbeddingSet(tiny["tokenizer"], tiny["text_encoder"]).add(emb)
    assert str(err.value) == (f"{NFIXER}: embedding made for SD 2.x (1024 wide), but this model is the built-in tiny "
                              f"model (64 wide); use an embedding made for this model")
