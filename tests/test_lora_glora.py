"""LyCORIS GLoRA: the patched layers of the tiny model against LyCORIS's module itself, written out in float64 as
its forward computes it (y = W0·(x + s·a1·a2·x) + s·b1·b2·x, with convolutions for a conv layer), for LyCORIS 2's
layout (plain and Tucker) and the older one A1111 reads; strength, restore, inspect, convert, bake and the tools
that refuse it."""


import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sdtune.lora import formats
from sdtune.lora.inspect import describe
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
    bakes_but_merges_not(base, path, layers, "glora")


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
