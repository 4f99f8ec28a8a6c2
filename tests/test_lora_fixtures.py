"""Real LoRA files made by other tools (../shared/fixtures/lora, see its README) load with the promised content.

They are matched against the real SD 1.5 module structure, built on the meta device (no weights, fast).
"""

import json

import pytest
import torch

from sdtune import families
from sdtune.lora import formats, inspect, keys
from sdtune.safeio import SdtuneError

# file stem -> what its README promises: (format, modules per component, ranks, alphas, scales)
EXPECTED = {
    "FaithSang_animelora__pytorch_lora_weights": ("peft", {"unet": 96}, {4}, {16.0}, {4.0}),
    "Hirvita6_flower__pytorch_lora_weights": ("diffusers-old", {"unet": 128}, {4}, {None}, {1.0}),
    "catundchat_sd15lora__pytorch_lora_weights": ("diffusers-old", {"unet": 128}, {4}, {None}, {1.0}),
    "LyCORIS__smart_falcon_4_lokr": ("lycoris-lokr", {"unet": 278, "text_encoder": 72}, {4}, {4.0}, {1.0}),
    "cloneofsimo_lora__lora_disney": ("cloneofsimo", {"unet": 144, "text_encoder": 48}, {1}, {None}, {1.0}),
    "hansjohn_animestyle__sd15_text_encoder__adapter_model": ("peft", {"text_encoder": 24}, {8}, {8.0}, {1.0}),
}
SD2_FILE = "vfph55_my_lora__pytorch_lora_weights"


@pytest.fixture(scope="module")
def lora_dir(fixtures_dir):
    return fixtures_dir / "lora"


@pytest.fixture(scope="module")
def sd15():
    return keys.reference(families.SD1)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_fixture_loads_as_promised(stem, lora_dir, sd15):
    fmt, modules, ranks, alphas, scales = EXPECTED[stem]
    lora = formats.load_lora(lora_dir / f"{stem}.safetensors")
    assert lora.format == fmt and not lora.unknown
    assert {c: len(m) for c, m in lora.modules.items() if m} == modules
    assert {ad.rank for _, _, ad in lora.items()} == ranks
    assert {ad.alpha for _, _, ad in lora.items()} == alphas
    assert {round(ad.scale, 6) for _, _, ad in lora.items()} == scales
    report = keys.match(lora, sd15)
    assert report.ok and len(report.matched) == len(lora) and report.family_guess == families.SD1
    report.raise_if_bad(source=stem)


def test_processor_and_old_diffusers_keys_land_on_attention_modules(lora_dir):
    for stem in ("catundchat_sd15lora__pytorch_lora_weights", "Hirvita6_flower__pytorch_lora_weights"):
        unet = formats.load_lora(lora_dir / f"{stem}.safetensors").modules["unet"]
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in unet
        assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for p in unet)
        assert len([p for p in unet if p.endswith("attn2.to_k")]) == 16  # every SD 1.x cross-attention


def test_faithsang_scale_from_header(lora_dir):
    """r=4, lora_alpha=16 live only in the lora_adapter_metadata header: ΔW = 4 · B @ A."""
    path = lora_dir / "FaithSang_animelora__pytorch_lora_weights.safetensors"
    lora = formats.load_lora(path)
    p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        a, b = f.get_tensor(f"{p}.lora_A.weight"), f.get_tensor(f"{p}.lora_B.weight")
    torch.testing.assert_close(lora.modules["unet"][p].delta((320, 320)), 4.0 * (b @ a))


def test_lokr_fixture_text_and_resnet_convs(lora_dir, sd15):
    path = lora_dir / "LyCORIS__smart_falcon_4_lokr.safetensors"
    lora = formats.load_lora(path)
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(lora.metadata["ss_network_args"])["algo"] == "lokr"
    conv = "down_blocks.1.resnets.0.conv1"
    assert conv in lora.modules["unet"] and "encoder.layers.0.mlp.fc1" in lora.modules["text_encoder"]
    assert sd15["unet"][conv] == (640, 320, 3, 3)
    # ΔW from the raw factors with LyCORIS' formula: kron(w1a @ w1b, w2a @ w2b) · alpha / rank, as the kernel
    from safetensors import safe_open
    name = "lora_unet_" + conv.replace(".", "_")
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(f"{name}.{k}").float() for k in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b",
                                                               "alpha")}
    rank = t["lokr_w1_b"].shape[0]
    want = torch.kron(t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (t["alpha"] / rank)
    torch.testing.assert_close(lora.modules["unet"][conv].delta(sd15["unet"][conv]), want.reshape(640, 320, 3, 3))
    info = inspect.describe(path)
    assert info["lycoris"] == "LoKr" and info["conv_layers"] > 0 and info["metadata"]["ss_network_dim"] == "4"
    assert info["modules"] == {"unet": 278, "text_encoder": 72}


def test_lokr_fixture_written_as_kohya_keeps_its_conv_rank(lora_dir, tmp_path):
    """A LoKr's factors are flattened, so its convolutions are known by the architecture: the kohya file written
    from it says its conv rank and alpha (LyCORIS' conv_dim, which the fixture wrote as conv_rank)."""
    out = tmp_path / "lokr.safetensors"
    formats.convert(lora_dir / "LyCORIS__smart_falcon_4_lokr.safetensors", out, to="kohya")
    args = json.loads(formats.load_lora(out).metadata["ss_network_args"])
    assert (args["algo"], args["conv_dim"], float(args["conv_alpha"])) == ("lokr", "4", 4.0)


def test_cloneofsimo_fixture_order_and_embeddings(lora_dir, sd15):
    lora = formats.load_lora(lora_dir / "cloneofsimo_lora__lora_disney.safetensors")
    assert set(lora.embeddings) == {"<s1>", "<s2>"} and lora.embeddings["<s1>"].shape == (768,)
    unet = list(lora.modules["unet"])
    assert unet[4] == "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # its up is [2560, 1]
    assert unet[143] == "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert list(lora.modules["text_encoder"])[:4] == [f"encoder.layers.0.self_attn.{p}"
                                                      for p in ("k_proj", "v_proj", "q_proj", "out_proj")]
    info = inspect.describe(lora_dir / "cloneofsimo_lora__lora_disney.safetensors")
    assert info["embeddings"] == {"<s1>": [768], "<s2>": [768]}


def test_peft_text_encoder_alpha_comes_from_config_beside(lora_dir):
    path = lora_dir / "hansjohn_animestyle__sd15_text_encoder__adapter_model.safetensors"
    lora = formats.load_lora(path)
    assert set(lora.modules["text_encoder"]) == {f"encoder.layers.{i}.self_attn.{p}" for i in range(12)
                                                 for p in ("q_proj", "v_proj")}
    from sdtune.safeio import load_state
    bare = formats.from_state_dict(*load_state(path))  # without the config: no alpha known, scale 1
    assert {ad.alpha for _, _, ad in bare.items()} == {None}


def test_sd2_fixture_refused_naming_sd2(lora_dir, sd15):
    lora = formats.load_lora(lora_dir / f"{SD2_FILE}.safetensors")
    assert next(iter(lora.modules["unet"].values())).tensors["down"].dtype == torch.bfloat16
    report = keys.match(lora, sd15)
    assert report.family_guess == families.SD2 and len(report.shape_mismatch) == 32
    with pytest.raises(SdtuneError, match=r"this LoRA is for SD 2\.x; the model is SD 1\.x.*attn2\.to_k"):
        report.raise_if_bad(source=SD2_FILE)
    with pytest.warns(UserWarning, match="SD 2.x"):
        report.raise_if_bad(allow_partial=True, source=SD2_FILE)
    assert inspect.describe(lora_dir / f"{SD2_FILE}.safetensors")["family"] == "sd2"


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_fixture_converts_losslessly(stem, lora_dir, tmp_path):
    src = lora_dir / f"{stem}.safetensors"
    original = formats.load_lora(src)
    targets = ["kohya"]
    if all(ad.kind == "lora" for _, _, ad in original.items()) and not original.embeddings:
        targets.append("diffusers")
    for to in targets:
        out = tmp_path / f"{to}.safetensors"
        formats.convert(src, out, to=to)
        back = formats.load_lora(out)
        assert {(c, p) for c, p, _ in back.items()} == {(c, p) for c, p, _ in original.items()}, to
        for comp, p, ad in original.items():
            got = back.modules[comp][p]
            assert got.kind == ad.kind and got.tensors.keys() == ad.tensors.keys()
            assert all(torch.equal(got.tensors[k], v) for k, v in ad.tensors.items()), (to, p)
            assert got.scale == ad.scale, (to, p)  # same factors, same scale: the same ΔW
        assert all(torch.equal(back.embeddings[n], e.reshape(back.embeddings[n].shape))
                   for n, e in original.embeddings.items())


@pytest.mark.parametrize("stem", sorted(EXPECTED) + [SD2_FILE])
def test_inspect_every_fixture(stem, lora_dir):
    info = inspect.describe(lora_dir / f"{stem}.safetensors")
    json.dumps(info)
    text = inspect.render(info)
    assert info["format"] in text and "ranks" in text
