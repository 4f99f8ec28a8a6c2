"""Registering embeddings: same tokens, ids and rows as diffusers' load_textual_inversion; exact unloading."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from sdtune.safeio import SdtuneError
from sdtune.ti.formats import Embedding, load_embedding, save_embedding
from sdtune.ti.tokens import EmbeddingSet, find_in_dir, find_in_prompt, scan_dir
from sdtune.tiny.model import build

D = 64
PROMPTS = ["a photo of <cat-toy> on a table", "<multi> and <multi>, again <multi>", "neg-embed, bare-word <bare>",
           "plain words only"]


@pytest.fixture(scope="module")
def pristine():
    return build(seed=0)


@pytest.fixture
def parts(pristine):
    """A fresh copy of the tiny model's tokenizer and text encoder for each test."""
    return copy.deepcopy(pristine["tokenizer"]), copy.deepcopy(pristine["text_encoder"])


def table(text_encoder):
    return text_encoder.get_input_embeddings().weight.detach()


def rows(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def diffusers_pipe(pristine):
    """A diffusers pipeline on an identical copy of the model: the oracle."""
    return StableDiffusionPipeline(
        vae=pristine["vae"], unet=pristine["unet"], scheduler=pristine["scheduler"],
        text_encoder=copy.deepcopy(pristine["text_encoder"]), tokenizer=copy.deepcopy(pristine["tokenizer"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_all_formats(folder):
    """One synthetic file per layout, d=64: (path, token override or None) pairs."""
    save_file({"<cat-toy>": rows(1, 1)[0]}, folder / "cat.safetensors")  # diffusers, 1-D
    save_file({"<multi>": rows(3, 2)}, folder / "learned_embeds.safetensors")  # diffusers, multi-vector
    torch.save({"<bin-tok>": rows(1, 3)}, folder / "learned_embeds.bin")  # diffusers .bin, 2-D single
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(rows(2, 4))},
                "name": "a1111-style", "step": 10}, folder / "a1111.pt")  # A1111
    save_file({"emb_params": rows(4, 5)}, folder / "neg-embed.safetensors")  # kohya: token = file name
    torch.save(rows(1, 6)[0], folder / "bare.pt")  # bare tensor, token given
    return [(folder / "cat.safetensors", None), (folder / "learned_embeds.safetensors", None),
            (folder / "learned_embeds.bin", None), (folder / "a1111.pt", None),
            (folder / "neg-embed.safetensors", "neg-embed"), (folder / "bare.pt", "<bare>")]


def snapshot(tokenizer, text_encoder, prompts=PROMPTS):
    return {
        "len": len(tokenizer), "vocab_size": tokenizer.vocab_size, "vocab": tokenizer.get_vocab(),
        "added": repr(sorted(tokenizer.added_tokens_decoder.items())),
        "ids": [tokenizer(p).input_ids for p in prompts], "pieces": [tokenizer.tokenize(p) for p in prompts],
        "decoded": [tokenizer.decode(tokenizer(p).input_ids) for p in prompts],
        "config_vocab": text_encoder.config.vocab_size, "rows": text_encoder.get_input_embeddings().num_embeddings,
    }


@pytest.mark.parametrize("index", range(6), ids=["diffusers-1d", "diffusers-multi", "diffusers-bin", "a1111",
                                                 "kohya", "bare-tensor"])
def test_each_format_matches_diffusers(tmp_path, pristine, parts, index):
    path, token = write_all_formats(tmp_path)[index]
    tokenizer, text_encoder = parts
    pipe = diffusers_pipe(pristine)
    names = EmbeddingSet(tokenizer, text_encoder).add(load_embedding(path, token=token))
    pipe.load_textual_inversion(str(path), token=token)

    assert tokenizer.get_added_vocab() == pipe.tokenizer.get_added_vocab()
    assert names == [t for t in pipe.tokenizer.get_added_vocab() if not t.startswith("<|")]
    assert torch.equal(table(text_encoder), table(pipe.text_encoder))
    assert text_encoder.config.vocab_size == len(tokenizer) == 49408 + len(names)


def test_all_formats_together_match_diffusers_and_prompts_tokenize_the_same(tmp_path, pristine, parts):
    files = write_all_formats(tmp_path)
    tokenizer, text_encoder = parts
    embeddings = EmbeddingSet(tokenizer, text_encoder)
    for path, token in files:
        embeddings.add(load_embedding(path, token=token))
    pipe = diffusers_pipe(pristine)
    pipe.load_textual_inversion([str(p) for p, _ in files], token=[t or load_embedding(p).token for p, t in files])

    assert tokenizer.get_added_vocab() == pipe.tokenizer.get_added_vocab()
    assert torch.equal(table(text_encoder), table(pipe.text_encoder))
    for prompt in PROMPTS:  # lower-case tokens: diffusers' own prompt expansion works and is the oracle
        ours = tokenizer(embeddings.expand(prompt)).input_ids
        assert ours == pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids
    multi_ids = embeddings.ids("<multi>")
    assert len(multi_ids) == 3 and tokenizer(embeddings.expand(PROMPTS[1])).input_ids.count(multi_ids[2]) == 3
    with torch.no_grad():  # the encoder runs on the new ids and the rows are what it reads
        ids = torch.tensor([tokenizer(embeddings.expand(PROMPTS[1]), padding="max_length", max_length=77).input_ids])
        out = text_encoder(ids).last_hidden_state
        assert out.shape == (1, 77, D) and torch.isfinite(out).all()
        assert torch.equal(text_encoder.get_input_embeddings()(ids)[0, 1:4], load_embedding(files[1][0]).vectors)


def test_remove_one_matches_diffusers_unload_and_remove_all_restores_exactly(tmp_path, pristine, parts):
    files = write_all_formats(tmp_path)
    tokenizer, text_encoder = parts
    before, weight_before = snapshot(tokenizer, text_encoder), table(text_encoder).clone()
    backend_before = tokenizer._tokenizer
    embeddings = EmbeddingSet(tokenizer, text_encoder)
    for path, token in files:
        embeddings.add(load_embedding(path, token=token))
    assert snapshot(tokenizer, text_encoder) != before

    pipe = diffusers_pipe(pristine)
    pipe.load_textual_inversion([str(p) for p, _ in files], token=[t or load_embedding(p).token for p, t in files])
    embeddings.remove("<multi>")
    pipe.unload_textual_inversion("<multi>")
    pipe.unload_textual_inversion(["<multi>_1", "<multi>_2"])
    assert tokenizer.get_added_vocab() == pipe.tokenizer.get_added_vocab()
    assert torch.equal(table(text_encoder), table(pipe.text_encoder))
    assert embeddings.tokens == ["<cat-toy>", "<bin-tok>", "a1111-style", "neg-embed", "<bare>"]
    assert torch.equal(embeddings.get("neg-embed").vectors, rows(4, 5))  # survivors keep their vectors

    embeddings.remove_all()
    after = snapshot(tokenizer, text_encoder)
    for key in before:
        assert after[key] == before[key], key
    assert torch.equal(table(text_encoder), weight_before)
    assert tokenizer._tokenizer is backend_before  # the very same backend object is back
    assert len(tokenizer.tokenize("<cat-toy>")) > 1  # the removed token splits into BPE pieces again
    assert embeddings.tokens == []


def test_tokens_added_or_cut_by_another_loader_are_refused_not_dropped(tmp_path, pristine):
    """diffusers' load_textual_inversion on the same tokenizer: sdtune's remove rebuilt from its own list and
    dropped the other token silently; diffusers' unload cut sdtune's, whose word then read as <|endoftext|>."""
    pipe = diffusers_pipe(pristine)
    embeddings = EmbeddingSet(pipe.tokenizer, pipe.text_encoder)
    embeddings.add(Embedding("<dog>", rows(2, 1), "dog.pt", "diffusers"))
    save_file({"<cat>": rows(1, 2)}, tmp_path / "cat.safetensors")
    pipe.load_textual_inversion(str(tmp_path / "cat.safetensors"))
    said = r"the tokenizer or the text encoder's table was changed outside sdtune's embeddings"
    for change in (lambda: embeddings.remove("<dog>"), lambda: embeddings.expand("a <dog>"),
                   lambda: embeddings.add(Embedding("<owl>", rows(1, 3), "owl.pt", "diffusers"))):
        with pytest.raises(SdtuneError, match=said):
            change()
    assert pipe.tokenizer.convert_tokens_to_ids("<cat>") == len(pipe.tokenizer) - 1  # diffusers' word kept
    pipe.unload_textual_inversion("<cat>")
    embeddings.remove("<dog>")  # the two agree again
    pipe.unload_textual_inversion()  # diffusers' unload-all also cuts sdtune's tokens
    embeddings.add(Embedding("<dog>", rows(2, 1), "dog.pt", "diffusers"))
    pipe.unload_textual_inversion()
    with pytest.raises(SdtuneError, match=said):
        embeddings.expand("a <dog>")


def test_remove_one_equals_never_having_loaded_it(tmp_path, pristine, parts):
    files = write_all_formats(tmp_path)
    tokenizer, text_encoder = parts
    embeddings = EmbeddingSet(tokenizer, text_encoder)
    for path, token in files[:3]:
        embeddings.add(load_embedding(path, token=token))
    embeddings.remove("<cat-toy>")

    ref_tokenizer, ref_encoder = copy.deepcopy(pristine["tokenizer"]), copy.deepcopy(pristine["text_encoder"])
    reference = EmbeddingSet(ref_tokenizer, ref_encoder)
    for path, token in files[1:3]:
        reference.add(load_embedding(path, token=token))
    assert snapshot(tokenizer, text_encoder) == snapshot(ref_tokenizer, ref_encoder)
    assert torch.equal(table(text_encoder), table(ref_encoder))
    with pytest.raises(SdtuneError, match=r"'<cat-toy>' is not loaded \(loaded: <multi>, <bin-tok>\)"):
        embeddings.remove("<cat-toy>")


def test_expand_every_occurrence_idempotent_and_case_insensitive(parts):
    embeddings = EmbeddingSet(*parts)
    embeddings.add(Embedding("<Ml>", rows(3, 1), "ml.pt", "diffusers"))
    embeddings.add(Embedding("<Ml-x>", rows(1, 2), "mlx.pt", "diffusers"))
    prompt = "<Ml> then <ml>,<ML>   and <ml-x> and typed <Ml>_1"
    expanded = embeddings.expand(prompt)
    assert expanded == "<Ml> <Ml>_1 <Ml>_2 then <Ml> <Ml>_1 <Ml>_2,<Ml> <Ml>_1 <Ml>_2   and <ml-x> and typed <Ml>_1"
    assert embeddings.expand(expanded) == expanded
    ids = embeddings.ids("<Ml>")
    encoded = parts[0](expanded, add_special_tokens=False).input_ids
    assert encoded.count(ids[0]) == 3 and encoded.count(ids[2]) == 3 and encoded.count(ids[1]) == 4
    assert embeddings.expand("nothing here") == "nothing here"
    assert parts[0].decode(encoded[:3]) == "<ml><ml>_1<ml>_2"  # decode still drops CLIP's "</w>" markers
    # a whole word only, as the tokenizer finds one: inside "<Ml>s", "a<Ml>" or "<Ml>é" it names no embedding, and
    # spelling it out there made its sub-tokens words of their own (vectors the prompt never asked for)
    for inside in ("the <Ml>s", "a<Ml> b", "<Ml>é", "<ml>_x"):
        assert embeddings.expand(inside) == inside
        assert ids[0] not in parts[0](inside, add_special_tokens=False).input_ids
    assert embeddings.expand("(<Ml>:1.2)-x") == "(<Ml> <Ml>_1 <Ml>_2:1.2)-x"


def test_errors_name_the_problem_and_the_fix(parts):
    embeddings = EmbeddingSet(*parts)
    with pytest.raises(SdtuneError, match=r"x\.pt: token 'style' is already in the tokenizer's vocabulary; "
                                          r"load it under another name: x\.pt:NEWTOKEN"):
        embeddings.add(Embedding("style", rows(1, 0), "x.pt", "a1111"))
    with pytest.raises(SdtuneError, match=r"y\.pt: token 'Photo' is already in the tokenizer's vocabulary"):
        embeddings.add(Embedding("Photo", rows(2, 0), "y.pt", "a1111"))  # CLIP lowercases: Photo is photo
    embeddings.add(Embedding("<a>", rows(1, 0), "first.pt", "diffusers"))
    with pytest.raises(SdtuneError, match=r"second\.pt: token '<A>' is already loaded \(from first\.pt\).*second\.pt:"):
        embeddings.add(Embedding("<A>", rows(1, 0), "second.pt", "diffusers"))
    for width, family in ((768, "SD 1.x"), (1024, "SD 2.x"), (1280, "SDXL's text_encoder_2")):
        with pytest.raises(SdtuneError, match=rf"^w\.pt: embedding made for {family} \({width} wide\), but this model "
                                              rf"is the built-in tiny model \(64 wide\); use an embedding made for this "
                                              rf"model$"):
            embeddings.add(Embedding("<w>", torch.zeros(1, width), "w.pt", "diffusers"))
    sdxl = Embedding("<xl>", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "xl.safetensors", "sdxl")
    with pytest.raises(SdtuneError, match=r"^xl\.safetensors: embedding made for SDXL \(clip_l 768 and clip_g 1280 "
                                          r"wide\), but this model is the built-in tiny model \(64 wide\)"):
        embeddings.add(sdxl)
    assert embeddings.tokens == ["<a>"] and len(parts[0]) == 49409 and table(parts[1]).shape == (49409, D)


def test_sub_token_collision_is_named(parts):
    embeddings = EmbeddingSet(*parts)
    embeddings.add(Embedding("<z>_1", rows(1, 0), "one.pt", "diffusers"))
    with pytest.raises(SdtuneError, match=r"two\.pt: sub-token '<z>_1' of the 2-vector token '<z>'"):
        embeddings.add(Embedding("<z>", rows(2, 0), "two.pt", "diffusers"))
    assert embeddings.tokens == ["<z>_1"] and len(parts[0]) == 49409


def test_add_placeholder_copies_the_init_row(parts):
    tokenizer, text_encoder = parts
    base = table(text_encoder).clone()
    embeddings = EmbeddingSet(tokenizer, text_encoder)
    ids = embeddings.add_placeholder("<s*>", "dog", num_vectors=2)
    dog = tokenizer.encode("dog", add_special_tokens=False)[0]
    assert ids == [49408, 49409] and embeddings.ids("<s*>") == ids
    assert torch.equal(table(text_encoder)[ids], base[[dog, dog]])
    assert torch.equal(table(text_encoder)[:49408], base)
    got = embeddings.get("<s*>")
    assert (got.token, got.vectors.shape) == ("<s*>", (2, D))
    with pytest.raises(SdtuneError, match=r"--init-token 'golden retriever' is 2 tokens \(golden</w> retriever</w>\)"):
        embeddings.add_placeholder("<t*>", "golden retriever")
    with pytest.raises(SdtuneError, match="--token 'a b'"):
        embeddings.add_placeholder("a b", "dog")


def test_trained_rows_save_and_load_in_diffusers(tmp_path, pristine, parts):
    tokenizer, text_encoder = parts
    embeddings = EmbeddingSet(tokenizer, text_encoder)
    ids = embeddings.add_placeholder("<s*>", "cat", num_vectors=2)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = rows(2, 9)  # what training would do
    save_embedding(embeddings.get("<s*>"), tmp_path / "learned_embeds.safetensors")
    save_embedding(embeddings.get("<s*>"), tmp_path / "s.pt", format="a1111")
    for name in ("learned_embeds.safetensors", "s.pt"):
        pipe = diffusers_pipe(pristine)
        pipe.load_textual_inversion(str(tmp_path / name))
        assert pipe.tokenizer.get_added_vocab() == tokenizer.get_added_vocab()
        assert torch.equal(table(pipe.text_encoder), table(text_encoder))


def test_embedding_dir_lookup(tmp_path):
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": rows(2, 0)}, tmp_path / "EasyThing.safetensors")
    torch.save({"<x>": rows(1, 0)}, tmp_path / "sub" / "bad-hands-5.pt")
    (tmp_path / "notes.txt").write_text("not an embedding")
    assert scan_dir(tmp_path) == {"EasyThing": tmp_path / "EasyThing.safetensors",
                                  "bad-hands-5": tmp_path / "sub" / "bad-hands-5.pt"}
    assert find_in_dir(tmp_path, "EasyThing") == tmp_path / "EasyThing.safetensors"
    assert find_in_dir(tmp_path, "easything") == tmp_path / "EasyThing.safetensors"
    assert find_in_dir(tmp_path, "missing") is None
    assert find_in_prompt(tmp_path, "(easything:1.2), bad-hands-5, a dog") == {
        "EasyThing": tmp_path / "EasyThing.safetensors", "bad-hands-5": tmp_path / "sub" / "bad-hands-5.pt"}
    assert find_in_prompt(tmp_path, "bad-hands-50 and EasyThings") == {}
    with pytest.raises(SdtuneError, match="is not a folder"):
        scan_dir(tmp_path / "nope")
