"""--max-token-length 150 | 225 (kohya's): a caption's first 150 or 225 tokens, in chunks of 75 encoded apart and put
one after the other as A1111 encodes a long prompt (sdtune's own prompt encoding is the oracle), on SD 1.x and SDXL
(both tokenizers, the pooled embedding of the first chunk); a run reads what a 75-token one cuts."""

import pytest
import torch

from sdtune.generate import TextStack, encode_prompt
from sdtune.lora.formats import load_lora
from sdtune.models import load_base
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.tiny import world
from sdtune.train.config import LoraSettings
from sdtune.train.lora import train_lora

LONG = " ".join(["red star"] * 50)  # 100 tokens: past one chunk, inside two
SHORT = "a blue circle"


@pytest.mark.parametrize("model", ["tiny-random", "tiny-xl-random"])
def test_chunks_are_the_window_of_each_75_tokens_and_encode_as_a1111s_long_prompt(model):
    base = load_base(model)
    one, two = TextStack.of(base), TextStack.of(base, chunks=2)
    for tok, plain, chunked in zip(one.tokenizers, one.ids([LONG, SHORT], "cpu"), two.ids([LONG, SHORT], "cpu")):
        assert chunked.shape == (2, 2, 77)
        assert torch.equal(chunked[:, 0], plain)  # the first chunk is what a 75-token run reads
        body = tok(LONG, add_special_tokens=False).input_ids
        assert chunked[0, 1, 1:26].tolist() == body[75:100] and chunked[0, 1, 26] == tok.eos_token_id
        assert torch.equal(chunked[1, 1], one.ids([""], "cpu")[one.tokenizers.index(tok)][0])  # past the end: empty
    with torch.no_grad():
        hidden, pooled = two(two.ids([LONG, SHORT], "cpu"))
    want = encode_prompt(base, [LONG, SHORT])  # A1111's chunks (no commas or emphasis here to tell them apart)
    assert hidden.shape == want.hidden.shape == (2, 154, hidden.shape[-1])
    assert torch.allclose(hidden, want.hidden.float(), atol=1e-4, rtol=1e-4)
    if pooled is not None:  # SDXL: the first chunk's
        assert torch.allclose(pooled, want.pooled.float(), atol=1e-4, rtol=1e-4)


def _dataset(folder, ending):
    scenes = world.concept_scenes(4, seed=3, style="outline")
    data = world.write_dataset(folder, scenes, template=None, with_style=False)
    for caption in data.glob("*.txt"):
        caption.write_text(f"{LONG} {ending}")  # the same 100 tokens, then one that differs
    return data


def test_a_run_reads_the_tokens_a_75_token_one_cuts(base, tmp_path, recwarn):
    red, blue = _dataset(tmp_path / "red", "red"), _dataset(tmp_path / "blue", "blue")

    def train(data, out, length):
        return load_lora(train_lora(base, LoraSettings(data=str(data), out=str(tmp_path / out), steps=2,
                                                       batch_size=2, rank=4, alpha=4, lr=1e-2, progress=False,
                                                       max_token_length=length, report=False)))

    def same(a, b):
        return all(torch.equal(x.tensors["up"], y.tensors["up"]) for (_, _, x), (_, _, y) in zip(a.items(), b.items()))

    assert same(train(red, "red75", 75), train(blue, "blue75", 75))  # both cut at 75: the same run
    wide = train(red, "red150", 150)
    assert not same(wide, train(blue, "blue150", 150))  # the 101st token is read
    assert read_metadata(tmp_path / "red150" / "lora.safetensors")["ss_max_token_length"] == "150"
    assert read_metadata(tmp_path / "red75" / "lora.safetensors")["ss_max_token_length"] == "None"
    said = [str(w.message) for w in recwarn if "caption longer than" in str(w.message)]
    assert said and "--max-token-length 150 or 225" in said[0]


def test_other_lengths_are_refused():
    with pytest.raises(SdtuneError, match=r"--max-token-length 100: choose one of 75, 150, 225"):
        LoraSettings(data="d", out="o", max_token_length=100).check()
