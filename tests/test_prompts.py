"""A1111's prompt syntax in generation (``sdtune.prompts``): emphasis, BREAK, and prompts past 75 tokens encoded
in chunks rather than cut. The expected features are computed here from the encoder's plain output with A1111's
"No norm" emphasis (each token's features times its weight)."""

import logging

import pytest
import torch

from sdtune.generate import TextStack, encode_prompt, generate
from sdtune.models import load_base
from sdtune.prompts import parse, tokenize

LONG = "a red circle on a white background, " * 12  # 96 tokens: two chunks


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny-random")


@pytest.fixture(scope="module")
def xl():
    return load_base("tiny-xl", device="cpu", dtype="fp32")


@pytest.mark.parametrize("prompt, runs", [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("((a)) [b]", [("a", pytest.approx(1.21)), (" ", 1.0), ("b", pytest.approx(1 / 1.1))]),
    (r"\(x\) y", [("(x) y", 1.0)]),  # escaped brackets are characters
    ("a BREAK b", [("a ", 1.0), ("BREAK", 0.0), (" b", 1.0)]),
    ("a ) b (c", [("a ) b ", 1.0), ("c", pytest.approx(1.1))]),  # a stray closer is text; an opener weights the rest
    ("(a:b) BREAKfast", [("a:b", pytest.approx(1.1)), (" BREAKfast", 1.0)]),
])
def test_parse(prompt, runs):
    assert parse(prompt) == runs


def plain_features(base, prompts):
    """What sdtune encoded before this syntax: the tokenizers' own 77 tokens (cut at 75)."""
    text = TextStack.of(base)
    with torch.no_grad():
        return text(text.ids(prompts, base.device))


def test_a_plain_prompt_is_encoded_bit_for_bit_as_the_tokenizer_does(tiny, xl):
    for base in (tiny, xl):
        prompts = ["", "a red circle on a white background, Blue"]
        hidden, pooled = plain_features(base, prompts)
        got = encode_prompt(base, prompts)
        assert torch.equal(got.hidden, hidden)
        assert (got.pooled is None) == (pooled is None) and (pooled is None or torch.equal(got.pooled, pooled))


def test_emphasis_scales_its_tokens(tiny):
    plain, _ = plain_features(tiny, ["a red circle"])
    got = encode_prompt(tiny, ["a (red:1.5) [circle]"]).hidden
    ids, _ = tokenize(tiny.text_encoders()[0][2:], ["a red circle"])  # [bos, a, red, circle, eos, ...]
    weights = torch.ones(77, dtype=torch.float64)
    weights[2], weights[3] = 1.5, 1 / 1.1
    want = plain[0].double() * weights[:, None]
    torch.testing.assert_close(got[0].double(), want, rtol=1e-6, atol=1e-7)
    assert ids[0].shape == (1, 1, 77)


def test_long_prompts_are_chunked_not_cut(tiny, xl, caplog):
    for base in (tiny, xl):
        width = base.unet.config.cross_attention_dim
        with caplog.at_level(logging.INFO):
            got = encode_prompt(base, ["a cat", LONG])
        assert not caplog.records  # the tokenizer's "longer than 77" notice is not printed
        assert got.hidden.shape == (2, 154, width)  # the short prompt padded with an empty chunk to line up
        # the words past the 75th token now count: change one and only the second chunk moves
        other = encode_prompt(base, ["a cat", LONG[:-12] + "green star, "])
        torch.testing.assert_close(other.hidden[1, :77], got.hidden[1, :77], rtol=1e-5, atol=1e-5)
        assert (other.hidden[1, 77:] - got.hidden[1, 77:]).abs().max() > 1e-3
        if got.pooled is not None:  # SDXL's pooled embedding: the first chunk's
            text = TextStack.of(base)
            ids, _ = tokenize(text.tokenizers, ["a cat", LONG])
            with torch.no_grad():
                _, first = text([i[:, 0] for i in ids])
            torch.testing.assert_close(got.pooled, first, rtol=1e-5, atol=1e-5)


def test_break_starts_a_new_chunk(tiny):
    ids, _ = tokenize([tiny.tokenizer], ["a red circle BREAK on white"])
    tok = tiny.tokenizer
    first, second = ids[0][0]
    assert first[:5].tolist() == [tok.bos_token_id, *tok("a red circle", add_special_tokens=False).input_ids,
                                  tok.eos_token_id]
    assert second[:4].tolist() == [tok.bos_token_id, *tok("on white", add_special_tokens=False).input_ids,
                                   tok.eos_token_id]


def test_generation_takes_long_and_weighted_prompts(xl):
    long = generate(xl, LONG + "(red:1.3)", negative_prompt="blurry", steps=1, seed=3, progress=False)
    assert long[0].image.size == (64, 64) and "(red:1.3)" in long[0].infotext  # the prompt as typed
