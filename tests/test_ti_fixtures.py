"""Real embedding files made by other tools (../shared/fixtures/ti): they load on a 768-wide text encoder exactly
as diffusers loads them, fail clearly on the 64-wide tiny model; SDXL files read (and are refused on SD 1.x
in one line), the unsafe pickle is refused. SDXL and SD 2.x loading is in test_ti_families.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.lora.inspect import describe
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import load_embedding
from sdtune.ti.tokens import EmbeddingSet
from sdtune.tiny.model import build

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ti"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real embedding fixtures not found at {FIXTURES}")

BAD_HANDS = FIXTURES / "mayaru_bestconfig__bad-hands-5.pt"
EASY_NEGATIVE = FIXTURES / "mayaru_bestconfig__EasyNegative.safetensors"
BIRB = FIXTURES / "fastai_diffusion-nbs__learned_embeds.bin"
DETAIL = FIXTURES / "ttekcor_Embedding_sd__learned_embeds.safetensors"
SDXL = FIXTURES / "HK200202_emojii__embeddings.pti"
ORIGINAL_TI = FIXTURES / "Birch-san_stable-diffusion__embeddings.pt"

# file -> (token, vectors, format); EasyNegative carries no token, so its file name is the token
EXPECTED = {
    BAD_HANDS: ("bad-hands-5", 2, "a1111"),
    EASY_NEGATIVE: ("mayaru_bestconfig__EasyNegative", 8, "kohya"),
    BIRB: ("<birb-style>", 1, "diffusers"),
    DETAIL: ("<detail-schemas>", 1, "diffusers"),
}
SD1_FILES = list(EXPECTED)


@pytest.fixture(scope="module")
def tiny():
    parts = build(seed=0)
    return parts["tokenizer"], parts["text_encoder"]


@pytest.fixture(scope="module")
def sd1_width(tiny):
    """A 1-layer CLIP text encoder as wide as SD 1.x's (768), with the real CLIP tokenizer: fast but compatible."""
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=256, num_hidden_layers=1,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return copy.deepcopy(tiny[0]), CLIPTextModel(config)


@pytest.mark.parametrize("path", SD1_FILES, ids=lambda p: p.stem)
def test_tokens_and_vector_counts(path):
    emb = load_embedding(path)
    assert (emb.token, emb.num_vectors, emb.format) == EXPECTED[path]
    assert emb.width == 768 and emb.vectors.dtype == torch.float32 and emb.vectors.device.type == "cpu"
    assert torch.isfinite(emb.vectors).all() and emb.vectors.abs().sum() > 0


def test_load_on_768_wide_encoder_like_diffusers_and_unload_exactly(sd1_width):
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder = sd1_width
    weight_before, len_before = text_encoder.get_input_embeddings().weight.detach().clone(), len(tokenizer)
    prompt = "EasyNegative, bad-hands-5, <birb-style> <detail-schemas>"
    ids_before = tokenizer(prompt).input_ids
    tokens = ["bad-hands-5", "EasyNegative", None, None]
    oracle_tokenizer, oracle_encoder = copy.deepcopy(tokenizer), copy.deepcopy(text_encoder)

    embeddings = EmbeddingSet(tokenizer, text_encoder)
    for path, token in zip(SD1_FILES, tokens):
        embeddings.add(load_embedding(path, token=token))
    parts = build(seed=0)
    pipe = StableDiffusionPipeline(vae=parts["vae"], unet=parts["unet"], scheduler=parts["scheduler"],
                                   text_encoder=oracle_encoder, tokenizer=oracle_tokenizer, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion([str(p) for p in SD1_FILES],
                                token=[t or EXPECTED[p][0] for p, t in zip(SD1_FILES, tokens)])
    assert tokenizer.get_added_vocab() == oracle_tokenizer.get_added_vocab()
    assert torch.equal(text_encoder.get_input_embeddings().weight, oracle_encoder.get_input_embeddings().weight)

    # every vector reaches the encoder, even for the mixed-case EasyNegative that diffusers' own prompt rewrite
    # misses (its tokenize() lower-cases the token and then looks it up case-sensitively)
    ids = tokenizer(embeddings.expand(prompt)).input_ids
    for token, count in (("EasyNegative", 8), ("bad-hands-5", 2), ("<birb-style>", 1), ("<detail-schemas>", 1)):
        assert [i for i in ids if i in embeddings.ids(token)] == embeddings.ids(token)
        assert len(embeddings.ids(token)) == count
    assert torch.equal(text_encoder.get_input_embeddings().weight[embeddings.ids("bad-hands-5")],
                       load_embedding(BAD_HANDS).vectors)

    embeddings.remove_all()
    assert len(tokenizer) == len_before and tokenizer(prompt).input_ids == ids_before
    assert torch.equal(text_encoder.get_input_embeddings().weight, weight_before)


@pytest.mark.parametrize("path", SD1_FILES, ids=lambda p: p.stem)
def test_sd1_files_fail_clearly_on_the_tiny_model(tiny, path):
    tokenizer, text_encoder = tiny
    embeddings = EmbeddingSet(tokenizer, text_encoder)
    with pytest.raises(SdtuneError, match=rf"{path.name}: embedding made for SD 1\.x \(768 wide\), but this model is "
                                          rf"the built-in tiny model \(64 wide\)"):
        embeddings.add(load_embedding(path))
    assert len(tokenizer) == 49408 and text_encoder.get_input_embeddings().num_embeddings == 49408


SDXL_FILES = {  # file -> (token: the file name, vectors, format)
    SDXL: ("HK200202_emojii__embeddings", 2, "pti"),
    FIXTURES / "Kaleidia__SDXL-Detail.safetensors": ("Kaleidia__SDXL-Detail", 2, "sdxl"),
    FIXTURES / "roettger_XLTI__myPuppet768.pt": ("roettger_XLTI__myPuppet768", 1, "emb2"),
}


@pytest.mark.parametrize("path", list(SDXL_FILES), ids=lambda p: p.stem)
def test_sdxl_files_read_and_are_refused_on_sd1_in_one_line(sd1_width, path):
    emb = load_embedding(path)
    assert (emb.token, emb.num_vectors, emb.format) == SDXL_FILES[path]
    assert emb.widths == {"clip_l": 768, "clip_g": 1280}
    tokenizer, text_encoder = sd1_width
    with pytest.raises(SdtuneError) as err:
        EmbeddingSet(tokenizer, text_encoder).add(emb)
    assert str(err.value) == (f"{path}: embedding made for SDXL (clip_l 768 and clip_g 1280 wide), but this model is "
                              f"SD 1.x (768 wide); use an embedding made for this model")
    assert len(tokenizer) == 49408 and text_encoder.get_input_embeddings().num_embeddings == 49408


def test_original_textual_inversion_pickle_is_refused():
    with pytest.raises(SdtuneError) as err:
        load_embedding(ORIGINAL_TI)
    message = str(err.value)
    assert message.startswith(str(ORIGINAL_TI)) and "\n" not in message
    assert "original textual_inversion embedding" in message and "will not unpickle" in message
    with pytest.raises(SdtuneError) as err:  # inspect says the same (it said "a pickle" as the LoRA reader does)
        describe(ORIGINAL_TI)
    assert str(err.value) == message
