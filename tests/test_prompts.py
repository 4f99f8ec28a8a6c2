"""A1111's prompt syntax in generation (``sdtune.prompts``): emphasis, BREAK, and prompts past 75 tokens encoded
in chunks rather than cut. The expected features are computed here from the encoder's plain output with A1111's
"No norm" emphasis (each token's features times its weight)."""

import logging

import numpy as np
import pytest
import torch

from sdtune.generate import TextStack, encode_prompt, generate, make_scheduler
from sdtune.models import load_base
from sdtune.prompts import parse, schedule, text_at, tokenize
from sdtune.ti.formats import Embedding

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
    ("a \\ b", [("a  b", 1.0)]),  # a backslash escaping nothing goes, as in A1111
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


def test_chunks_are_cut_where_a1111_cuts_them(tiny):
    """A1111's tokenize_line: a full chunk ends at a comma up to 20 tokens back (the words after it start the
    next chunk), a multi-vector embedding that does not fit starts the next chunk whole, a BREAK at the end adds
    no chunk."""
    tok = tiny.tokenizer

    def chunk_texts(prompt):
        ids, _ = tokenize([tok], [tiny.embeddings.expand(prompt)])
        return [[name.removesuffix("</w>") for name in tok.convert_ids_to_tokens(row.tolist())
                 if name not in (tok.bos_token, tok.eos_token, tok.pad_token)] for row in ids[0][0]]

    near = chunk_texts("a " * 70 + ", " + "b " * 10)  # the comma 5 tokens back from the 75th: cut there
    assert [len(c) for c in near] == [71, 10] and near[0][-1] == "," and set(near[1]) == {"b"}
    far = chunk_texts("a " * 50 + ", " + "b " * 30)  # 25 back: past A1111's 20, cut at 75
    assert [len(c) for c in far] == [75, 6]
    assert [len(c) for c in chunk_texts("a red circle BREAK")] == [3]  # A1111: `if chunk.tokens or not chunks`
    assert [len(c) for c in chunk_texts("BREAK a red circle")] == [0, 3]
    tiny.embeddings.add(Embedding.from_parts("<mv3>", {"": torch.randn(3, 64)}, "test", "diffusers"))
    try:
        whole = chunk_texts("a " * 73 + "<mv3>")  # 73 + 3 > 75: the three vectors move on together
        assert [len(c) for c in whole] == [73, 3] and whole[1] == ["<mv3>", "<mv3>_1", "<mv3>_2"]
    finally:
        tiny.embeddings.remove("<mv3>")


@pytest.mark.parametrize("prompt, plan", [
    # A1111's own examples (prompt_parser.py's doctests, 10 steps), and the forms its wiki gives
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("a [cat::0.3]", [(3, "a cat"), (10, "a ")]),  # removed after 30% of the steps
    ("a [cat:dog:1.0]", [(10, "a cat")]),  # with a point: a fraction, so all 10 steps
    ("a [cat:dog:0]", [(10, "a dog")]),
    ("a [red] (cat:1.2) [a:b] \\[x:y:2\\]", [(10, "a [red] (cat:1.2) [a:b] \\[x:y:2\\]")]),  # not edits
    ("[a|]", [(i, "a" if i % 2 else "") for i in range(1, 11)]),
])
def test_prompt_editing_schedules_as_a1111(prompt, plan):
    assert schedule(prompt, 10) == plan


def test_a_sampling_step_reads_the_text_a1111_gives_it():
    """A1111's denoiser counts from 0 and takes the first text scheduled up to its step or later: [a:b:2] is a for
    steps 0, 1 and 2; [a|b] is a, a, b, a, b."""
    assert [text_at(schedule("[a:b:2]", 5), i) for i in range(5)] == ["a", "a", "a", "b", "b"]
    assert [text_at(schedule("[a|b]", 5), i) for i in range(5)] == ["a", "a", "b", "a", "b"]


@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_generation_swaps_the_conditions_where_the_prompt_is_edited(model, tiny, xl):
    """The oracle: diffusers' own pipeline on the same embeddings (``encode_prompt`` of the same texts in one
    batch), swapped by its step callback after sampling step 2 ([red circle:blue square:2] on 5 steps), with the
    pooled embedding for SDXL. The same computation, so the pixels are equal."""
    base = tiny if model == "tiny" else xl
    kw = dict(negative_prompt="blurry", steps=5, seed=3, progress=False)
    (edited,) = generate(base, "a [red circle:blue square:2]", **kw)
    neg, first, then = encode_prompt(base, ["blurry", "a red circle", "a blue square"]).chunk(3)
    pipe = base.pipeline(make_scheduler("ddim", base.scheduler))
    pipe.set_progress_bar_config(disable=True)
    pooled = base.family.pooled_and_time_ids

    def swap(pipe, i, t, tensors):
        if i == 2:
            tensors["prompt_embeds"] = torch.cat([neg.hidden, then.hidden])
            if pooled:
                tensors["add_text_embeds"] = torch.cat([neg.pooled, then.pooled])
        return tensors

    shape = (1, base.unet.config.in_channels, 64 // pipe.vae_scale_factor, 64 // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(3))
    extra = {"pooled_prompt_embeds": first.pooled, "negative_pooled_prompt_embeds": neg.pooled} if pooled else {}
    want = pipe(prompt_embeds=first.hidden, negative_prompt_embeds=neg.hidden, **extra, num_inference_steps=5,
                guidance_scale=7.5, latents=latents, height=64, width=64, callback_on_step_end=swap,
                callback_on_step_end_tensor_inputs=["prompt_embeds"] + (["add_text_embeds"] if pooled else []),
                output_type="pil").images[0]
    assert np.array_equal(np.asarray(edited.image), np.asarray(want))
    # and it is neither prompt alone; the PNG keeps the prompt as typed, for A1111 to schedule again
    for alone in ("a red circle", "a blue square"):
        assert not np.array_equal(np.asarray(edited.image), np.asarray(generate(base, alone, **kw)[0].image))
    assert edited.infotext.startswith("a [red circle:blue square:2]\nNegative prompt: blurry\n")


@pytest.mark.parametrize("prompt,steps,scheduler,reads", [
    ("a [red:blue:3] circle", 6, "heun", "rrrrbbbbbbb"),  # 11 calls; A1111 schedules Heun over 12
    ("a [red|blue] circle", 5, "heun", "rrbrbrbrb"),
    ("a [red:blue:3] circle", 6, "euler", "rrrrbb"),
])
def test_edits_count_model_calls_as_a1111(tiny, prompt, steps, scheduler, reads):
    """A1111 counts an edit's step and alternation in model calls, over twice the steps for its second-order
    samplers (``total_steps``; ``CFGDenoiser`` counts each call): the text each UNet call reads is recorded."""
    enc = {t: encode_prompt(tiny, [f"a {t} circle"]).hidden[0] for t in ("red", "blue")}
    calls, forward = [], tiny.unet.forward

    def spy(sample, timestep, encoder_hidden_states, *a, **k):
        calls.append(next(c for c, e in enc.items() if torch.equal(e, encoder_hidden_states[-1])))
        return forward(sample, timestep, encoder_hidden_states, *a, **k)

    tiny.unet.forward = spy
    try:
        generate(tiny, prompt, steps=steps, scheduler=scheduler, seed=1, progress=False)
    finally:
        tiny.unet.forward = forward
    assert "".join(c[0] for c in calls) == reads


def test_an_edit_that_never_switches_is_the_plain_prompt(tiny):
    kw = dict(steps=3, seed=2, progress=False)
    plain = np.asarray(generate(tiny, "a red circle", **kw)[0].image)
    assert np.array_equal(np.asarray(generate(tiny, "a [red circle:blue square:3]", **kw)[0].image), plain)
    assert np.array_equal(np.asarray(generate(tiny, "a [blue square:red circle:0]", **kw)[0].image), plain)
    # without guidance (no negative branch) the swap still runs
    one = generate(tiny, "a [red|blue] circle", guidance=1.0, **kw)[0].image
    assert not np.array_equal(np.asarray(one), np.asarray(generate(tiny, "a red circle", guidance=1.0, **kw)[0].image))


def test_prompts_a1111_cannot_parse_get_no_editing_and_deep_ones_one_line():
    """A1111's editing grammar fails on a '|' outside an alternation, or a lone '\\' at the end, and then edits
    nothing (its emphasis still reads the brackets): so does sdtune, and says why. Brackets a thousand deep are one
    line, not a recursion traceback; a thousand unclosed '[' read quickly, as text."""
    import time

    from sdtune.safeio import SdtuneError

    for prompt in ("masterpiece | best quality, a [cat:dog:0.5]", "a [red|blue] ball, C:\\", "a [red|(b|c)] ball"):
        with pytest.warns(UserWarning, match=r"makes A1111 read no prompt editing in it, so neither does sdtune"):
            assert schedule(prompt, 10) == [(10, prompt)]
    assert [text for _, text in schedule("a [red|blue] \\| C:\\\\", 2)] == ["a red \\| C:\\\\", "a blue \\| C:\\\\"]
    assert schedule("a | b, [c]", 5) == [(5, "a | b, [c]")]  # nothing to edit: nothing said
    with pytest.raises(SdtuneError, match=r"^the prompt nests \[ \] 1200 deep; write at most 100 levels$"):
        schedule("[" * 1200 + "a:b:2" + "]" * 1200, 10)
    started = time.perf_counter()
    assert schedule("[a " * 4000, 10) == [(10, "[a " * 4000)]
    assert time.perf_counter() - started < 2  # was 6 s: each '[' rescanned the rest of the prompt
