"""LyCORIS IA3: the patched layers of the tiny model against LyCORIS's module forward written out in float64 (the
output rows scaled, y = W0·x·(1 + w·v) + b, or with ``on_input`` the input, y = W0·(x·(1 + w·v)) + b), on a linear
and a 3x3 conv layer; strength, restore, inspect, convert, bake, the tools that refuse it, and the keys that are
not IA3."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sdtune.cli import main
from sdtune.lora import formats
from sdtune.lora.inspect import describe
from sdtune.safeio import SdtuneError

CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 64 -> 32, no bias
CONV = "down_blocks.1.resnets.0.conv1"  # Conv2d 32 -> 64, 3x3, padding 1, with a bias
D = torch.float64


@pytest.fixture
def base(fresh_base):  # each test starts from the untouched weights
    return fresh_base


def kohya(path):
    return "lora_unet_" + path.replace(".", "_")


def ia3_layers(g, on_input):
    """LyCORIS's IA3 tensors for CROSS and CONV: v [n] for a linear layer, [1, n, 1, 1] for a conv, n the output
    width (or the input width, on_input); on_input as LyCORIS saves it, an int64 scalar."""
    n_lin, n_conv = (64, 32) if on_input else (32, 64)
    return {CROSS: {"weight": torch.randn(n_lin, generator=g) * 0.3, "on_input": torch.tensor(int(on_input))},
            CONV: {"weight": torch.randn(1, n_conv, 1, 1, generator=g) * 0.3, "on_input": torch.tensor(int(on_input))}}


def save(tmp_path, name, layers):
    sd = {f"{kohya(path)}.{role}": v for path, t in layers.items() for role, v in t.items()}
    save_file(sd, tmp_path / name)
    return tmp_path / name


def lycoris_forward(x, w0, b0, t, m):
    """LyCORIS's IA3 forward, float64: the scale 1 + m·v on the input (on_input) or on W0's output, the bias
    added as it is (its merged weight keeps the layer's bias)."""
    v = 1 + m * t["weight"].to(D).flatten()
    conv = w0.dim() == 4
    shape = (1, -1, 1, 1) if conv else (1, -1)

    def op(inp):
        return F.conv2d(inp, w0.to(D), padding=1) if conv else F.linear(inp, w0.to(D))
    y = op(x * v.reshape(shape)) if t["on_input"].item() else op(x) * v.reshape(shape)
    return y if b0 is None else y + b0.to(D).reshape(shape)


def layer_output(base, path, x):
    m = base.unet.get_submodule(path)
    w = m.weight.detach().to(D)
    bias = None if m.bias is None else m.bias.detach().to(D)
    return F.linear(x, w, bias) if w.dim() == 2 else F.conv2d(x, w, bias, padding=1)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_layers_compute_what_the_lycoris_module_computes(base, tmp_path, on_input):
    g = torch.Generator().manual_seed(1)
    layers = ia3_layers(g, on_input)
    path = save(tmp_path, "ia3.safetensors", layers)
    mods = {p: base.unet.get_submodule(p) for p in layers}
    w0 = {p: m.weight.detach().clone() for p, m in mods.items()}
    inputs = {CROSS: torch.randn(3, 64, generator=g, dtype=D), CONV: torch.randn(2, 32, 6, 6, generator=g, dtype=D)}
    for strength in (1.0, 0.6, -0.5):  # LyCORIS's multiplier scales v
        if strength == 1.0:
            base.loras.add("i", path)
        else:
            base.loras.set_weights({"i": strength})
        for p, x in inputs.items():
            bias = None if mods[p].bias is None else mods[p].bias.detach()
            want = lycoris_forward(x, w0[p], bias, layers[p], strength)
            torch.testing.assert_close(layer_output(base, p, x), want, rtol=1e-5, atol=1e-5)
    base.loras.remove("i")
    assert all(torch.equal(mods[p].weight, w0[p]) for p in layers)  # bit for bit
    info = describe(path)
    assert info["kinds"] == {"ia3": 2} and info["lycoris"] == "IA3" and info["unknown_keys"] == []


def test_ia3_converts_bakes_and_is_refused_by_the_low_rank_tools(base, tmp_path, bakes_but_merges_not, capsys):
    g = torch.Generator().manual_seed(3)
    layers = ia3_layers(g, on_input=False)
    path = save(tmp_path, "ia3.safetensors", layers)
    # kohya/LyCORIS keys out: the same tensors (the output named by --out, as the other commands take it)
    assert main(["convert", str(path), "--to", "kohya", "--out", str(tmp_path / "again.safetensors")]) == 0
    again, sd = load_file(tmp_path / "again.safetensors"), load_file(path)
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    assert main(["convert", str(path), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 2
    assert "IA3 adapters have no layout that diffusers loads (PEFT has no such adapter in diffusers); write this " \
           "LoRA in the kohya layout, which A1111 loads" in capsys.readouterr().err  # ComfyUI has no IA3
    assert not (tmp_path / "d.safetensors").exists()
    for named in ([], [str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y.safetensors")]):
        assert main(["convert", str(path), *named, "--to", "kohya"]) == 2
        assert "convert: name the file to write once" in capsys.readouterr().err
    bakes_but_merges_not(base, path, layers, "ia3")


def test_ia3_that_does_not_fit_or_lacks_its_flag_is_one_clear_error(base, tmp_path):
    g = torch.Generator().manual_seed(4)
    wide = {CROSS: {"weight": torch.randn(64, generator=g), "on_input": torch.tensor(0)}}  # 64 rows: it has 32
    no_flag = {f"{kohya(CROSS)}.weight": torch.randn(32, generator=g)}
    save_file(no_flag, tmp_path / "no_flag.safetensors")
    said = {}
    for name, path in (("wide", save(tmp_path, "wide.safetensors", wide)), ("no_flag", tmp_path / "no_flag.safetensors")):
        with pytest.raises(SdtuneError) as err:
            base.loras.add(name, path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
        said[name] = str(err.value)
    assert not len(base.loras)
    assert "another shape" in said["wide"]
    assert f"the IA3 tensors of {kohya(CROSS)} make no adapter (incomplete IA3: no on_input); the file is damaged" in said["no_flag"]


def test_a_comfyui_unet_checkpoint_is_not_read_as_ia3(tmp_path):
    """ComfyUI's LoRA layout is diffusion_model.<path>.<suffix>; IA3's suffix is a bare ``weight``, so a UNet
    checkpoint saved by ComfyUI (diffusion_model.<path>.weight / .bias) must not read as a file of damaged IA3s."""
    sd = {"diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3),
          "diffusion_model.input_blocks.0.0.bias": torch.ones(4)}
    with pytest.raises(SdtuneError, match=r"^unet.safetensors: this is a UNet's weights \(diffusion_model.… keys, as "
                                          r"ComfyUI saves a UNet\), not a LoRA$"):
        formats.from_state_dict(sd, source="unet.safetensors")
