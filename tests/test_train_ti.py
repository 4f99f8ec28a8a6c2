"""Textual Inversion training: only the new rows learn; the files load in diffusers and sdtune; exact resume."""

import logging
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

import sdtune
from sdtune.console import SdtuneWarning
from sdtune.models import load_base
from sdtune.safeio import SdtuneError, load_state, read_metadata
from sdtune.ti.formats import load_embedding
from sdtune.tiny import model as tiny
from sdtune.tiny import world
from sdtune.train import loop
from sdtune.train.config import TISettings
from sdtune.train.scan import scan_folder
from sdtune.train.ti import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    SplicedEmbedding,
    add_token,
    init_rows,
    prompt_templates,
    spread,
    train_ti,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    scenes = world.concept_scenes(5, seed=2, shape="star", colour="purple")
    folder = world.write_dataset(tmp_path_factory.mktemp("ti"), scenes)
    for f in folder.glob("*.txt"):
        f.unlink()  # no captions: prompt templates
    return folder


def settings(dataset, out, **kw):
    return TISettings(**{**dict(data=str(dataset), out=str(out), token="<pstar>", init_token="star", steps=4,
                                batch_size=2, lr=5e-2, sample_steps=2, progress=False), **kw})


def table(base):
    return base.text_encoder.get_input_embeddings().weight.detach().clone()


def test_only_the_new_rows_learn_and_the_file_loads_in_diffusers(dataset, tmp_path):
    base = load_base("tiny-random")
    before = table(base)
    grads_seen = []
    path = train_ti(base, settings(dataset, tmp_path, formats=["diffusers", "a1111"]),
                    callback=lambda s, loss: grads_seen.append(loss))
    after = table(base)
    n = before.shape[0]
    assert after.shape == (n + 1, before.shape[1])
    assert torch.equal(after[:n], before)  # every old row bit-identical
    star = base.tokenizer.convert_tokens_to_ids("star</w>")
    assert not torch.allclose(after[n], before[star])  # the new row moved away from its init
    new_id = base.tokenizer.convert_tokens_to_ids("<pstar>")
    assert new_id == n and base.embeddings.ids("<pstar>") == [n]
    assert not any(isinstance(m, SplicedEmbedding) for m in base.text_encoder.modules())

    # diffusers' loader: same token id and vector
    parts = tiny.build(seed=0)
    pipe = StableDiffusionPipeline(**{k: parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    pipe.load_textual_inversion(str(path))
    assert pipe.tokenizer.convert_tokens_to_ids("<pstar>") == new_id
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[new_id], after[n])
    # the A1111 file carries the token name and the same vector; both load in sdtune
    a1111 = load_embedding(tmp_path / "pstar.pt")
    assert a1111.token == "<pstar>" and a1111.format == "a1111" and torch.equal(a1111.vectors[0], after[n])
    assert torch.equal(load_embedding(path).vectors[0], after[n])
    facts = read_metadata(path)  # what the file records of its run, the sdtune that made it among them
    assert facts["sdtune.step"] == "4" and facts["sdtune.version"] == sdtune.__version__
    # prompts with the token now condition differently from the init word
    ids = base.tokenizer(["a photo of a <pstar>", "a photo of a star"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        out = base.text_encoder(ids)[0]
    assert not torch.allclose(out[0], out[1])


def test_multi_vector_token_and_captions_that_mention_it(dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, f in enumerate(sorted(dataset.glob("*.png"))):
        (data / f.name).write_bytes(f.read_bytes())
        (data / f.with_suffix(".txt").name).write_text(f"a <mv> on a white background {i}")
    base = load_base("tiny-random")
    before = table(base)
    path = train_ti(base, settings(data, tmp_path / "out", token="<mv>", num_vectors=3))
    after = table(base)
    assert after.shape[0] == before.shape[0] + 3 and torch.equal(after[:before.shape[0]], before)
    emb = load_embedding(path)
    assert emb.vectors.shape == (3, 64) and torch.equal(emb.vectors, after[-3:])
    assert not torch.equal(emb.vectors[0], emb.vectors[1])  # each vector learns its own row
    assert base.embeddings.expand("a <mv>") == "a <mv> <mv>_1 <mv>_2"
    parts = tiny.build(seed=0)
    pipe = StableDiffusionPipeline(**{k: parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<mv>", "<mv>_1", "<mv>_2"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], emb.vectors)


def test_prompt_source_templates_or_captions(dataset, tmp_path):
    scan = scan_folder(dataset, require_captions=False)
    assert prompt_templates(scan, "<t>", "object") == [t.format("<t>") for t in OBJECT_TEMPLATES]
    assert prompt_templates(scan, "<t>", "style")[0] == STYLE_TEMPLATES[0].format("<t>")
    scan.examples[0].caption = "a <T> thing"  # case-insensitive, like the CLIP tokenizer
    with pytest.raises(SdtuneError, match="0001.png: its caption does not mention <t>"):
        prompt_templates(scan, "<t>", "object")
    for ex in scan.examples:
        ex.caption = "a <t> here"
    assert prompt_templates(scan, "<t>", "object") is None
    for ex in scan.examples:  # captions, none naming the token: not used, and said
        ex.caption = "a red square"
    with pytest.warns(SdtuneWarning, match="no caption mentions <t>, so the captions are not used: training on the "
                                           "object prompt templates"):
        assert prompt_templates(scan, "<t>", "object")[0] == OBJECT_TEMPLATES[0].format("<t>")


def test_bad_tokens_fail_clearly_and_leave_the_base_unchanged(dataset, tmp_path):
    base = load_base("tiny-random")
    before = table(base)
    with pytest.raises(SdtuneError, match="--token 'star' is already in the tokenizer's vocabulary"):
        train_ti(base, settings(dataset, tmp_path, token="star"))
    captioned = tmp_path / "captioned"  # captions without the token: the known word is still what is said first
    shutil.copytree(dataset, captioned)
    for image in captioned.glob("*.png"):
        image.with_suffix(".txt").write_text("a red star")
    with pytest.raises(SdtuneError, match="--token 'red' is already in the tokenizer's vocabulary"):
        train_ti(base, settings(captioned, tmp_path / "o", token="red"))
    with pytest.raises(SdtuneError, match="--token 'my star': must be one word"):
        train_ti(base, settings(dataset, tmp_path, token="my star"))
    for blank in ("", "  "):
        with pytest.raises(SdtuneError, match="no init token"):
            train_ti(base, settings(dataset, tmp_path, init_token=blank))
    # an embedding file as the init "word" read as the words of its path: refused
    with pytest.raises(SdtuneError, match=r"^--init-token emb/star.safetensors: a file's name; to start from an "
                                          r"embedding give it as --init-embedding"):
        train_ti(base, settings(dataset, tmp_path, init_token="emb/star.safetensors"))
    assert torch.equal(table(base), before) and len(base.tokenizer) == before.shape[0]


def test_resume_equals_uninterrupted_and_failure_unloads_the_token(dataset, tmp_path, monkeypatch):
    kw = dict(steps=5, save_every=2, flip=True, num_vectors=2)
    whole = load_embedding(train_ti(load_base("tiny-random"), settings(dataset, tmp_path / "whole", **kw)))

    class Stop(Exception):
        pass

    def stop(step, loss):
        if step == 3:
            raise Stop()

    base = load_base("tiny-random")
    n = len(base.tokenizer)
    with pytest.raises(Stop):
        train_ti(base, settings(dataset, tmp_path / "cut", **kw), callback=stop)
    assert len(base.tokenizer) == n and "<pstar>" not in base.embeddings  # the failed run unloaded its token
    state, _ = load_state(tmp_path / "cut" / loop.STATE_FILE)
    assert state["step"] == 2 and (tmp_path / "cut" / "learned_embeds-step000002.safetensors").is_file()
    resumed = load_embedding(train_ti(base, settings(dataset, tmp_path / "cut", **kw)))
    assert torch.equal(whole.vectors, resumed.vectors)


def test_vectors_spread_over_the_init_tokens():
    rows = torch.tensor([[0.0, 0.0], [2.0, 4.0], [4.0, 8.0]])  # three tokens
    assert torch.equal(spread(rows, 1), torch.tensor([[2.0, 4.0]]))  # one vector: the mean
    assert torch.equal(spread(rows, 3), rows)  # as many vectors as tokens: one each
    assert torch.equal(spread(rows, 2), torch.tensor([[0.0, 0.0], [3.0, 6.0]]))  # groups [0], [1, 2]
    assert torch.equal(spread(rows, 5), rows[[0, 0, 1, 1, 2]])  # more vectors: each token over neighbours
    assert torch.equal(spread(rows[:1], 3), rows[[0, 0, 0]])  # one token: copies (the old single-word rule)


def test_init_text_of_several_tokens_starts_the_token(dataset, tmp_path):
    """"hexagon" is two CLIP tokens (hex + agon</w>); A1111 accepts it, and so does training now."""
    base = load_base("tiny-random")
    pieces = base.tokenizer.encode("hexagon", add_special_tokens=False)
    assert len(pieces) == 2
    token_rows = table(base)[pieces]
    assert torch.equal(init_rows(base, "hexagon", 1)[""], token_rows.mean(0, keepdim=True))
    assert torch.equal(init_rows(base, "hexagon", 2)[""], token_rows)
    assert torch.equal(init_rows(base, "red hexagon", 2)[""][1], token_rows.mean(0))  # red | hex agon
    ids = add_token(base, settings(dataset, tmp_path, token="<hx>", init_token="hexagon", num_vectors=2))
    assert torch.equal(table(base)[ids], token_rows)
    base.embeddings.remove("<hx>")
    # a whole run from a multi-token init: the file holds vectors that moved away from that start
    emb = load_embedding(train_ti(base, settings(dataset, tmp_path / "run", init_token="hexagon", steps=2)))
    assert emb.vectors.shape == (1, 64) and not torch.equal(emb.vectors[0], token_rows.mean(0))
