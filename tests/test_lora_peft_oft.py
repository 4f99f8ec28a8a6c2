"""PEFT's OFT layout (``oft_R.weight`` + adapter_config.json): adapters made and saved by PEFT itself on the tiny
SD1 model, read by sdtune, merged by ``base.loras`` and compared with PEFT's own ``merge_and_unload`` (the oracle)
under each config setting that changes the maths (Cayley-Neumann series or exact Cayley, COFT, block sharing);
strength, restore, the diffusers-prefixed layout with its header, and the errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from sdtune.cli import main
from sdtune.lora import formats
from sdtune.lora.algos.peft_oft import DEFAULTS, rotation
from sdtune.lora.inspect import describe
from sdtune.safeio import SdtuneError

peft = pytest.importorskip("peft")

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32
CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear: inputs wider than outputs
CONV = "down_blocks.1.resnets.0.conv1"  # Conv2d 32 -> 64, 3x3: 288 inputs flattened
TEXT_Q = "encoder.layers.0.self_attn.q_proj"
TARGETS = [ATTN, CROSS, CONV]


@pytest.fixture
def base(fresh_base):  # each test starts from the untouched weights
    return fresh_base


def weight(module, path):
    return module.get_submodule(path).weight.detach().clone()


def peft_oft(module, targets, seed, save_to=None, **config):
    """A PEFT OFT on ``targets`` of a copy of ``module`` with random rotations (init_weights=False draws them),
    saved by PEFT to ``save_to`` if given; returns its state dict as PEFT saves it and PEFT's merged weights."""
    torch.manual_seed(seed)
    config = peft.OFTConfig(**{"r": 0, "oft_block_size": 8, **config}, target_modules=targets, init_weights=False)
    model = peft.get_peft_model(copy.deepcopy(module), config)
    state = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    if save_to:
        model.save_pretrained(save_to)  # adapter_model.safetensors + adapter_config.json
    merged = model.merge_and_unload()
    return state, {t: weight(merged, t) for t in targets}


CONFIGS = {
    "defaults": {},  # Cayley-Neumann series, 5 terms
    "exact-cayley": {"use_cayley_neumann": False},
    "neumann-3-terms": {"num_cayley_neumann_terms": 3},
    "coft": {"coft": True, "eps": 1.5},  # a bound (eps/sqrt(blocks)) most random blocks exceed: projected
    "block-share": {"block_share": True, "use_cayley_neumann": False},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_peft_folder_matches_peft_merge(base, tmp_path, name):
    w0 = {t: weight(base.unet, t) for t in TARGETS}
    state, expected = peft_oft(base.unet, TARGETS, seed=len(name), save_to=tmp_path / "peft", **CONFIGS[name])
    assert any(k.endswith(ATTN + ".oft_R.weight") for k in state)  # the layout this reads
    for t in TARGETS:
        assert not torch.allclose(expected[t], w0[t], atol=1e-3)  # every adapter changes its layer

    lora = formats.load_lora(tmp_path / "peft", model_keys={"unet": base.unet})
    assert {ad.kind for _, _, ad in lora.items()} == {"peft-oft"} and not lora.unknown
    base.loras.add("o", tmp_path / "peft")
    for t in TARGETS:
        torch.testing.assert_close(weight(base.unet, t), expected[t], rtol=1e-5, atol=1e-6)
    base.loras.set_weights({"o": 0.6})  # strength scales the change from W0
    for t in TARGETS:
        torch.testing.assert_close(weight(base.unet, t), w0[t] + 0.6 * (expected[t] - w0[t]), rtol=1e-5, atol=1e-6)
    base.loras.remove("o")
    for t in TARGETS:
        assert torch.equal(weight(base.unet, t), w0[t])  # restored bit for bit


def test_the_two_cayley_settings_turn_opposite_ways():
    """PEFT's series sums (I + Q)(I − Q)⁻¹, its exact path solves (I − Q)(I + Q)⁻¹: the transpose. Each file is
    read as PEFT merges it (the tests above); here the long series meets the exact transform, transposed."""
    vec = torch.randn(3, 28, dtype=torch.float64) * 0.02  # blocks of 8
    series = rotation(vec, DEFAULTS | {"num_cayley_neumann_terms": 20})
    exact = rotation(vec, DEFAULTS | {"use_cayley_neumann": False})
    torch.testing.assert_close(series, exact.transpose(1, 2), rtol=0, atol=1e-12)
    eye = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    torch.testing.assert_close(exact @ exact.transpose(1, 2), eye, rtol=0, atol=1e-12)  # orthogonal
    assert (series - exact).abs().max() > 0.01


def test_raw_text_encoder_adapter_and_inspect(base, tmp_path):
    w0 = weight(base.text_encoder, TEXT_Q)
    _, expected = peft_oft(base.text_encoder, [TEXT_Q], seed=7, save_to=tmp_path / "te", oft_block_size=4)
    lora = formats.load_lora(tmp_path / "te")
    assert list(lora.modules["text_encoder"]) == [TEXT_Q]
    base.loras.add("o", tmp_path / "te" / "adapter_model.safetensors")
    torch.testing.assert_close(weight(base.text_encoder, TEXT_Q), expected[TEXT_Q], rtol=1e-5, atol=1e-6)
    base.loras.remove("o")
    assert torch.equal(weight(base.text_encoder, TEXT_Q), w0)
    info = describe(tmp_path / "te" / "adapter_model.safetensors")
    assert info["kinds"] == {"peft-oft": 1} and info["unknown_keys"] == [] and info["lycoris"] is None


def test_diffusers_prefixed_keys_take_the_config_from_the_header(base, tmp_path):
    config = {"use_cayley_neumann": False, "coft": True, "eps": 1.5}
    unet_state, expected = peft_oft(base.unet, [ATTN, CONV], seed=9, **config)
    sd = {"unet." + k.removeprefix("base_model.model."): v for k, v in unet_state.items()}
    header = {"unet.peft_type": "OFT", "unet.oft_block_size": 8} | {f"unet.{k}": v for k, v in config.items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(header)})
    base.loras.add("o", path)
    for t in (ATTN, CONV):
        torch.testing.assert_close(weight(base.unet, t), expected[t], rtol=1e-5, atol=1e-6)
    base.loras.remove("o")
    # without the header, PEFT's defaults (the series, no COFT) are another rotation: the config is what decides
    save_file(sd, path)
    base.loras.add("o", path)
    assert not torch.allclose(weight(base.unet, ATTN), expected[ATTN], atol=1e-4)


def test_no_other_layout_and_misshapen_tensors_are_clear_errors(base, tmp_path, capsys):
    state, _ = peft_oft(base.unet, [ATTN], seed=11, save_to=tmp_path / "peft")
    lora = formats.load_lora(tmp_path / "peft")
    with pytest.raises(SdtuneError, match="no kohya/LyCORIS layout"):
        formats.save_lora(lora, tmp_path / "k.safetensors")
    with pytest.raises(SdtuneError, match="have no layout that diffusers loads"):
        formats.save_lora(lora, tmp_path / "d.safetensors", format="diffusers")
    resized = tmp_path / "r.safetensors"
    assert main(["lora", "resize", str(tmp_path / "peft" / "adapter_model.safetensors"), "--rank", "2", "--out", str(resized)]) == 2
    assert "change the weight itself" in capsys.readouterr().err and not resized.exists()

    (key,) = state
    bad = tmp_path / "bad.safetensors"
    save_file({key: torch.zeros(4, 27)}, bad)  # 27 is no b(b-1)/2: the key is reported, not guessed at
    with pytest.raises(SdtuneError, match=r"bad.safetensors: the peft-oft tensors of .*to_q make no "
                                          r"adapter \(oft_R.weight has 27 entries per block: not b\(b-1\)/2 for any "
                                          r"block size b\); the file is damaged"):
        base.loras.add("o", bad)
    other = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(4, 15)}, other)  # blocks of 6: 4 of them are 24 inputs, the layer has 32
    with pytest.raises(SdtuneError, match=r"do not fit this model.*\(None, 24\) vs model \(32, 32\)"):
        base.loras.add("o", other)
    shared = tmp_path / "shared.safetensors"
    save_file({key: torch.zeros(1, 10)}, shared)  # one shared block of 5: 32 inputs are no whole number of them
    with pytest.raises(SdtuneError, match=r"do not fit this model.*\(None, None\) vs model \(32, 32\)"):
        base.loras.add("o", shared)  # refused before any layer is touched
    assert torch.equal(weight(base.unet, ATTN), weight(copy.deepcopy(base.unet), ATTN)) and not len(base.loras)


def test_checkpoint_merge_bakes_what_patching_gives(base, tmp_path):
    """``sdtune merge --lora adapter_model.safetensors:W`` streams a single file and bakes a PEFT OFT (its config
    beside it) to the bits ``base.loras`` gives the same adapter at W."""
    from safetensors.torch import load_file

    from sdtune import models

    peft_oft(base.unet, [ATTN, CONV], seed=13, save_to=tmp_path / "peft", use_cayley_neumann=False)
    adapter = tmp_path / "peft" / "adapter_model.safetensors"
    single = models.save_single_file(base, tmp_path / "base.safetensors")
    out = tmp_path / "baked.safetensors"
    assert main(["merge", "--model", str(single), "--lora", f"{adapter}:0.7", "--out", str(out)]) == 0
    before, after = load_file(str(single)), load_file(str(out))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert len(changed) == 2  # the two layers, nothing else
    base.loras.add("o", adapter, 0.7)
    want = [weight(base.unet, t) for t in (ATTN, CONV)]
    baked = [after[k] for k in changed]
    for w in want:
        assert any(b.shape == w.shape and torch.equal(b, w) for b in baked)
