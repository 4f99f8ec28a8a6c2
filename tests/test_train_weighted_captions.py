"""--weighted-captions (kohya's): A1111's emphasis in a caption, (word:1.2) and [word], read as generation reads a
prompt (sdtune's own prompt encoding is the oracle), on SD 1.x and SDXL, with --max-token-length's chunks; a run
with emphasis of 1 everywhere is the plain run, and emphasis changes what it learns."""

import pytest
import torch
from small_runs import factors, outline_dataset, settings

from sdtune.generate import TextStack, encode_prompt
from sdtune.models import load_base
from sdtune.train.lora import train_lora

CAPTIONS = ["a (red:1.5) circle on a [white] background", "a blue square"]


@pytest.mark.parametrize("model", ["tiny-random", "tiny-xl-random"])
def test_weighted_captions_encode_as_a_prompt_does(model):
    base = load_base(model)
    weighted, plain = TextStack.of(base, weighted=True), TextStack.of(base)
    ids, weights = weighted.tokens(CAPTIONS, "cpu")
    for tok, i, w, p in zip(weighted.tokenizers, ids, weights, plain.ids(["a red circle on a white background",
                                                                         "a blue square"], "cpu")):
        assert torch.equal(i[:, 0], p)  # the brackets and weights are out of the ids
        red = tok("red", add_special_tokens=False).input_ids
        assert w[0, 0, 2:2 + len(red)].tolist() == [1.5] * len(red)
        assert w[0, 0].tolist().count(1.5) == len(red) and 1 / 1.1 == pytest.approx(min(w[0, 0].tolist()))
        assert torch.equal(w[1], torch.ones_like(w[1]))
    with torch.no_grad():
        hidden, pooled = weighted(ids, weights)
        want = encode_prompt(base, CAPTIONS)
    assert torch.equal(hidden, want.hidden.float())
    if pooled is not None:
        assert torch.equal(pooled, want.pooled.float())
    # with two chunks: the second one empty, weights 1
    ids2, weights2 = TextStack.of(base, chunks=2, weighted=True).tokens(CAPTIONS, "cpu")
    assert ids2[0].shape == (2, 2, 77) and torch.equal(ids2[0][:, 0], ids[0][:, 0])
    assert torch.equal(weights2[0][:, 1], torch.ones(2, 77))
    # no emphasis anywhere: no weights, the plain ids
    none_ids, none_weights = weighted.tokens(["a (blue:1) square"], "cpu")
    assert none_weights is None and torch.equal(none_ids[0][:, 0], plain.ids(["a blue square"], "cpu")[0])


def test_a_run_reads_the_emphasis_and_weight_one_is_the_plain_run(base, tmp_path):
    def dataset(name, caption):
        data = outline_dataset(tmp_path / name)
        for path in data.glob("*.txt"):
            path.write_text(caption)
        return data

    plain = factors(train_lora(base, settings(dataset("plain", "a red circle, outline"), tmp_path / "a")))
    one = factors(train_lora(base, settings(dataset("one", "a red circle, (outline:1)"), tmp_path / "b",
                                            weighted_captions=True)))
    more = factors(train_lora(base, settings(dataset("more", "a red circle, (outline:1.4)"), tmp_path / "c",
                                             weighted_captions=True)))
    assert all(torch.equal(x, y) for k in plain for x, y in zip(plain[k], one[k]))
    assert any(not torch.equal(x, y) for k in plain for x, y in zip(plain[k], more[k]))
