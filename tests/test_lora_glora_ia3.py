"""LyCORIS's adapters whose change depends on W0, GLoRA and IA3: the patched layers of the tiny model against
LyCORIS's module itself, written out in float64 as its forward computes it. GLoRA: y = W0·(x + s·a1·a2·x) +
s·b1·b2·x, with convolutions for a conv layer, for LyCORIS 2's layout (plain and Tucker) and the older one A1111
reads. IA3: the output rows scaled, y = W0·x·(1 + w·v) + b, or with ``on_input`` the input, y = W0·(x·(1 + w·v)) +
b, on a linear and a 3x3 conv layer. For both: strength, restore, inspect, convert, bake, the tools that refuse
them, and the files that are damaged or are not theirs."""


import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sdtune.cli import main
from sdtune.lora import formats
from sdtune.lora.inspect import describe, render
from sdtune.safeio import SdtuneError

CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 64 -> 32, no bias
CONV = "down_blocks.1.resnets.0.conv1"  # Conv2d 32 -> 64, 3x3, padding 1, with a bias
D = torch.float64
RANK, ALPHA = 4, 2.0


@pytest.fixture
def base(fresh_base):  # each test starts from the untouched weights
    return fresh_base


def kohya(path):
    return "lora_unet_" + path.replace(".", "_")


def factors(g, out, inner, kernel=None, tucker=False):
    """LyCORIS 2's GLoRA tensors for a layer (a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in, k...]; 1x1 convs
    keep their two trailing 1s as LyCORIS saves them)."""
    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1
    one = (1, 1) if kernel else ()
    t = {"a1": rand(inner, RANK, *one), "a2": rand(RANK, inner, *one), "b1": rand(out, RANK, *one)}
    if tucker:
        t |= {"b2": rand(RANK, inner, 1, 1), "bm": rand(RANK, RANK, *kernel)}
    else:
        t["b2"] = rand(RANK, inner, *(kernel or ()))
    return t


def lycoris_linear(x, w0, t, s):
    """LyCORIS's GLoRA forward on a Linear layer, float64."""
    a1, a2, b1, b2 = (t[k].to(D) for k in ("a1", "a2", "b1", "b2"))
    return F.linear(x + s * F.linear(F.linear(x, a2), a1), w0.to(D)) + s * F.linear(F.linear(x, b2), b1)


def lycoris_conv(x, w0, b0, t, s):
    """LyCORIS's GLoRA forward on a 3x3 Conv2d (padding 1), float64; Tucker runs b2 (1x1), bm (3x3), b1 (1x1)."""
    a1, a2, b1, b2 = (t[k].to(D) for k in ("a1", "a2", "b1", "b2"))
    inner = F.conv2d(F.conv2d(x, a2), a1)
    b = F.conv2d(F.conv2d(x, b2), t["bm"].to(D), padding=1) if "bm" in t else F.conv2d(x, b2, padding=1)
    return F.conv2d(x + s * inner, w0.to(D), b0.to(D), padding=1) + s * F.conv2d(b, b1)


def save(tmp_path, name, layers, alpha=ALPHA):
    sd = {}
    for path, t in layers.items():
        sd |= {f"{kohya(path)}.{role}.weight": v for role, v in t.items()}
        sd[f"{kohya(path)}.alpha"] = torch.tensor(alpha)
    save_file(sd, tmp_path / name)
    return tmp_path / name


def layer_output(base, path, x):
    m = base.unet.get_submodule(path)
    w = m.weight.detach().to(D)
    bias = None if m.bias is None else m.bias.detach().to(D)
    return F.linear(x, w, bias) if w.dim() == 2 else F.conv2d(x, w, bias, padding=1)


@pytest.mark.parametrize("tucker", [False, True])
def test_glora_layers_compute_what_the_lycoris_module_computes(base, tmp_path, tucker):
    g = torch.Generator().manual_seed(1)
    layers = {CROSS: factors(g, 32, 64), CONV: factors(g, 64, 32, kernel=(3, 3), tucker=tucker)}
    path = save(tmp_path, "glora.safetensors", layers)
    lin, conv = base.unet.get_submodule(CROSS), base.unet.get_submodule(CONV)
    w0 = {CROSS: lin.weight.detach().clone(), CONV: conv.weight.detach().clone()}
    x_lin, x_conv = torch.randn(3, 64, generator=g, dtype=D), torch.randn(2, 32, 6, 6, generator=g, dtype=D)
    s = ALPHA / RANK
    for strength in (1.0, 0.6, -0.5):  # the strength scales both paths, as LyCORIS's multiplier does
        if strength == 1.0:
            base.loras.add("g", path)
        else:
            base.loras.set_weights({"g": strength})
        want = lycoris_linear(x_lin, w0[CROSS], layers[CROSS], s * strength)
        torch.testing.assert_close(layer_output(base, CROSS, x_lin), want, rtol=1e-5, atol=1e-5)
        want = lycoris_conv(x_conv, w0[CONV], conv.bias.detach(), layers[CONV], s * strength)
        torch.testing.assert_close(layer_output(base, CONV, x_conv), want, rtol=1e-5, atol=1e-5)
    base.loras.remove("g")
    assert torch.equal(lin.weight, w0[CROSS]) and torch.equal(conv.weight, w0[CONV])  # bit for bit
    info = describe(path)
    assert info["kinds"] == {"glora": 2} and info["lycoris"] == "GLoRA" and info["unknown_keys"] == []


def test_the_older_glora_layout_reads_as_the_same_adapter(base, tmp_path):
    """LyCORIS before 2.0 (and A1111's reader): a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r] with
    W' = W0 + s·(W0·a2·a1 + b2·b1): the same layer as LyCORIS 2's factors of those shapes."""
    g = torch.Generator().manual_seed(2)
    new = factors(g, 32, 64)
    old = {"a1": new["a2"], "a2": new["a1"], "b1": new["b2"], "b2": new["b1"]}
    base.loras.add("old", save(tmp_path, "old.safetensors", {CROSS: old}))
    patched = base.unet.get_submodule(CROSS).weight.detach().clone()
    base.loras.remove("old")
    w0 = base.unet.get_submodule(CROSS).weight.detach().to(D)
    a1, a2, b1, b2 = (old[k].to(D) for k in ("a1", "a2", "b1", "b2"))  # A1111: (w2b @ w1b) + ((W @ w2a) @ w1a)
    torch.testing.assert_close(patched.to(D), w0 + ALPHA / RANK * (b2 @ b1 + w0 @ a2 @ a1), rtol=1e-5, atol=1e-6)
    base.loras.add("new", save(tmp_path, "new.safetensors", {CROSS: new}))
    assert torch.equal(base.unet.get_submodule(CROSS).weight, patched)


def test_glora_converts_bakes_and_is_refused_by_the_low_rank_tools(base, tmp_path, bakes_but_merges_not):
    g = torch.Generator().manual_seed(3)
    layers = {CROSS: factors(g, 32, 64), CONV: factors(g, 64, 32, kernel=(3, 3))}
    path = save(tmp_path, "glora.safetensors", layers)
    formats.convert(path, tmp_path / "again.safetensors")  # kohya/LyCORIS keys out: the same tensors
    again, sd = load_file(tmp_path / "again.safetensors"), load_file(path)
    assert set(again) == set(sd) and all(torch.equal(again[k].reshape(sd[k].shape), sd[k]) for k in sd)
    bakes_but_merges_not(base, path, layers, "GLoRA")


def test_misshapen_glora_is_one_clear_error(base, tmp_path):
    g = torch.Generator().manual_seed(4)
    no_rank = factors(g, 32, 64)
    no_rank["a2"] = torch.randn(RANK + 1, 64, generator=g)  # a1 · a2 share no rank
    narrow = factors(g, 32, 32)  # a1 · a2 for 32 input features, on a layer of 64
    said = []
    for name, t in (("no_rank", no_rank), ("narrow", narrow)):
        with pytest.raises(SdtuneError) as err:
            base.loras.add(name, save(tmp_path, f"{name}.safetensors", {CROSS: t}))
        assert str(err.value).startswith(str(tmp_path / f"{name}.safetensors")) and "\n" not in str(err.value)
        said.append(str(err.value))
    assert not len(base.loras)
    assert f"the GLoRA tensors of {kohya(CROSS)} make no adapter (GLoRA factors of shapes a1 (64, 4), a2 (5, 64), b1 (32, 4), b2 (4, 64) share no rank); the " \
           "file is damaged" in said[0]
    assert "another shape" in said[1]


# ---------------------------------------------------------------------------------------------- IA3

def ia3_layers(g, on_input):
    """LyCORIS's IA3 tensors for CROSS and CONV: v [n] for a linear layer, [1, n, 1, 1] for a conv, n the output
    width (or the input width, on_input); on_input as LyCORIS saves it, an int64 scalar."""
    n_lin, n_conv = (64, 32) if on_input else (32, 64)
    return {CROSS: {"weight": torch.randn(n_lin, generator=g) * 0.3, "on_input": torch.tensor(int(on_input))},
            CONV: {"weight": torch.randn(1, n_conv, 1, 1, generator=g) * 0.3, "on_input": torch.tensor(int(on_input))}}


def save_ia3(tmp_path, name, layers):
    sd = {f"{kohya(path)}.{role}": v for path, t in layers.items() for role, v in t.items()}
    save_file(sd, tmp_path / name)
    return tmp_path / name


def ia3_forward(x, w0, b0, t, m):
    """LyCORIS's IA3 forward, float64: the scale 1 + m·v on the input (on_input) or on W0's output, the bias
    added as it is (its merged weight keeps the layer's bias)."""
    v = 1 + m * t["weight"].to(D).flatten()
    conv = w0.dim() == 4
    shape = (1, -1, 1, 1) if conv else (1, -1)

    def op(inp):
        return F.conv2d(inp, w0.to(D), padding=1) if conv else F.linear(inp, w0.to(D))
    y = op(x * v.reshape(shape)) if t["on_input"].item() else op(x) * v.reshape(shape)
    return y if b0 is None else y + b0.to(D).reshape(shape)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_layers_compute_what_the_lycoris_module_computes(base, tmp_path, on_input):
    g = torch.Generator().manual_seed(1)
    layers = ia3_layers(g, on_input)
    path = save_ia3(tmp_path, "ia3.safetensors", layers)
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
            want = ia3_forward(x, w0[p], bias, layers[p], strength)
            torch.testing.assert_close(layer_output(base, p, x), want, rtol=1e-5, atol=1e-5)
    base.loras.remove("i")
    assert all(torch.equal(mods[p].weight, w0[p]) for p in layers)  # bit for bit
    info = describe(path)
    assert info["kinds"] == {"ia3": 2} and info["lycoris"] == "IA3" and info["unknown_keys"] == []
    assert info["ranks"] == info["alphas"] == [] and info["alpha_missing"] == 0  # IA3 has neither
    assert re.search(r"^ranks +n/a$", render(info), re.M) and re.search(r"^alphas +n/a$", render(info), re.M)


def test_ia3_converts_bakes_and_is_refused_by_the_low_rank_tools(base, tmp_path, bakes_but_merges_not, capsys):
    g = torch.Generator().manual_seed(3)
    layers = ia3_layers(g, on_input=False)
    path = save_ia3(tmp_path, "ia3.safetensors", layers)
    # kohya/LyCORIS keys out: the same tensors (the output named by --out, as the other commands take it)
    assert main(["convert", str(path), "--to", "kohya", "--out", str(tmp_path / "again.safetensors")]) == 0
    again, sd = load_file(tmp_path / "again.safetensors"), load_file(path)
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    assert main(["convert", str(path), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 2
    assert "IA3 adapters have no layout that diffusers loads (PEFT has no such adapter in diffusers); write this " \
           "LoRA in the kohya layout, which A1111 loads" in capsys.readouterr().err  # ComfyUI has no IA3
    assert not (tmp_path / "d.safetensors").exists()
    for named, said in (([], "convert: no file to write; sdtune convert IN OUT --to LAYOUT"),
                        ([str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y.safetensors")],
                         f"convert: the file to write is given twice ({tmp_path / 'x.safetensors'} and --out "
                         f"{tmp_path / 'y.safetensors'}); give one")):
        assert main(["convert", str(path), *named, "--to", "kohya"]) == 2
        assert capsys.readouterr().err.strip() == f"sdtune: error: {said}"
    bakes_but_merges_not(base, path, layers, "IA3")


def test_ia3_that_does_not_fit_or_lacks_its_flag_is_one_clear_error(base, tmp_path):
    g = torch.Generator().manual_seed(4)
    wide = {CROSS: {"weight": torch.randn(64, generator=g), "on_input": torch.tensor(0)}}  # 64 rows: it has 32
    no_flag = {f"{kohya(CROSS)}.weight": torch.randn(32, generator=g)}
    save_file(no_flag, tmp_path / "no_flag.safetensors")
    said = {}
    for name, path in (("wide", save_ia3(tmp_path, "wide.safetensors", wide)), ("no_flag", tmp_path / "no_flag.safetensors")):
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
