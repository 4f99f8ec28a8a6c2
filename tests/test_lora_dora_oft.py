"""DoRA as a registry algorithm: PEFT files against PEFT's own merge (the oracle for that layout), kohya/LyCORIS
``dora_scale`` files against an independent float64 computation of LyCORIS's maths, each read from a file this
test writes and merged by ``base.loras`` on the tiny SD1 model; strength, restore, and the order with other LoRAs."""

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.lora import formats
from sdtune.lora.inspect import describe, render
from sdtune.lora.neutral import Adapter
from sdtune.safeio import SdtuneError

peft = pytest.importorskip("peft")

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32: square, so the axis matters
CONV = "down_blocks.1.resnets.0.conv1"  # Conv2d 32 -> 64, 3x3
TEXT_Q = "encoder.layers.0.self_attn.q_proj"
D = torch.float64
EPS = torch.finfo(torch.float32).eps


@pytest.fixture
def base(fresh_base):  # each test starts from the untouched weights
    return fresh_base


def weight(module, path):
    return module.get_submodule(path).weight.detach().clone()


def kohya(path):
    return "lora_unet_" + path.replace(".", "_")


def removed_and_described(base, name, w0, path, kind, label, oft_blocks=None):
    """Removing the adapter gives every layer its original bits back, and ``inspect`` names the algorithm."""
    base.loras.remove(name)
    for t in w0:
        assert torch.equal(weight(base.unet, t), w0[t])
    info = describe(path)
    assert info["kinds"] == {kind: len(w0)} and info["lycoris"] == label and info["unknown_keys"] == []
    if kind == "oft":  # its alpha is a constraint, not a factor on a ΔW: no scale is shown; its block sizes are
        assert info["scales"] == [] and info["oft_block_sizes"] == oft_blocks
        shown = ", ".join(f"{b} x {b} ({n} layer{'s' * (n > 1)})" for b, n in oft_blocks.items())
        assert re.search(rf"\nOFT block sizes +{re.escape(shown)}\n", render(info))


# ---------------------------------------------------------------- PEFT: its own merge is the oracle

def peft_dora(module, targets, seed, save_to=None, r=4, alpha=6):
    """A PEFT DoRA on ``targets`` of a copy of ``module``: random A, B and a magnitude moved off ‖W0‖ (so that
    every part counts), saved by PEFT to ``save_to`` if given; returns its state dict as PEFT saves it, and PEFT's
    merged weights."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(module), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape))
    state = peft.get_peft_model_state_dict(model)
    if save_to:
        model.save_pretrained(save_to)  # adapter_model.safetensors + adapter_config.json
    merged = model.merge_and_unload()
    return state, {t: weight(merged, t) for t in targets}


def test_peft_folder_matches_peft_merge_at_every_strength(base, tmp_path):
    w0 = {t: weight(base.unet, t) for t in (ATTN, CONV)}
    state, expected = peft_dora(base.unet, [ATTN, CONV], seed=1, save_to=tmp_path / "peft")  # alpha 6, r 4
    assert any(k.endswith(ATTN + ".lora_magnitude_vector") for k in state)  # the layout this reads

    lora = formats.load_lora(tmp_path / "peft", model_keys={"unet": base.unet})
    assert {ad.kind for _, _, ad in lora.items()} == {"dora"} and not lora.unknown
    assert lora.modules["unet"][ATTN].scale == pytest.approx(1.5)
    base.loras.add("d", tmp_path / "peft" / "adapter_model.safetensors")
    for t in (ATTN, CONV):
        torch.testing.assert_close(weight(base.unet, t), expected[t], rtol=1e-5, atol=1e-6)
    base.loras.set_weights({"d": 0.6})  # strength scales the change from W0 (A1111)
    for t in (ATTN, CONV):
        torch.testing.assert_close(weight(base.unet, t), w0[t] + 0.6 * (expected[t] - w0[t]), rtol=1e-5, atol=1e-6)
    base.loras.remove("d")
    for t in (ATTN, CONV):
        assert torch.equal(weight(base.unet, t), w0[t])  # restored bit for bit


def test_diffusers_prefixed_unet_and_text_encoder_keys(base, tmp_path):
    unet_state, unet_expected = peft_dora(base.unet, [ATTN], seed=2)
    text_state, text_expected = peft_dora(base.text_encoder, [TEXT_Q], seed=3)
    sd = {"unet." + k.removeprefix("base_model.model."): v for k, v in unet_state.items()}
    sd |= {"text_encoder." + k.removeprefix("base_model.model."): v for k, v in text_state.items()}
    header = {"unet.r": 4, "unet.lora_alpha": 6, "text_encoder.r": 4, "text_encoder.lora_alpha": 6}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(header)})

    base.loras.add("d", path)
    torch.testing.assert_close(weight(base.unet, ATTN), unet_expected[ATTN], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight(base.text_encoder, TEXT_Q), text_expected[TEXT_Q], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- kohya / LyCORIS: float64 oracle

def lycoris64(w0, down, up, dora_scale, alpha_over_rank, strength):
    """LyCORIS's DoRA written out in float64: V = W0 + (alpha/rank)·up@down; each input column (or, for a
    [out, 1] scale, each output row) of V rescaled to dora_scale / (its L2 norm + eps); then A1111's strength."""
    w0 = w0.to(D)
    out, inner = w0.shape[0], w0.shape[1]
    v = w0 + alpha_over_rank * (up.to(D).reshape(out, -1) @ down.to(D).reshape(down.shape[0], -1)).reshape(w0.shape)
    if dora_scale.shape[0] == 1:  # per input column: sum the squares over everything but dim 1
        sq = (v ** 2).transpose(0, 1).reshape(inner, -1).sum(1)
        norm = (sq.sqrt() + EPS).reshape(1, inner, *[1] * (w0.dim() - 2))
    else:
        norm = ((v ** 2).reshape(out, -1).sum(1).sqrt() + EPS).reshape(out, *[1] * (w0.dim() - 1))
    w_dora = v * dora_scale.to(D).reshape(norm.shape) / norm
    return (w0 + strength * (w_dora - w0)).float()


def lycoris_tensors(w0, g, rank=4, per_out=False):
    out, inner = w0.shape[0], w0.shape[1]
    kernel = tuple(w0.shape[2:])
    down = torch.randn(rank, inner, *kernel, generator=g) * 0.2
    up = torch.randn(out, rank, *[1] * len(kernel), generator=g) * 0.2
    if per_out:  # LyCORIS wd_on_out
        norm = w0.reshape(out, -1).norm(dim=1).reshape(out, *[1] * (w0.dim() - 1))
    else:  # kohya's default: one per input column
        norm = w0.transpose(0, 1).reshape(inner, -1).norm(dim=1).reshape(1, inner, *[1] * len(kernel))
    return down, up, norm * (1 + 0.5 * torch.rand(norm.shape, generator=g))


def test_lycoris_dora_scale_per_input_column_and_per_output_row(base, tmp_path):
    g = torch.Generator().manual_seed(4)
    to_k = ATTN.replace("to_q", "to_k")  # also square: only dora_scale's shape says which axis
    cases = {ATTN: False, CONV: False, to_k: True}
    w0 = {t: weight(base.unet, t) for t in cases}
    sd, tensors = {}, {}
    for t, per_out in cases.items():
        tensors[t] = lycoris_tensors(w0[t], g, per_out=per_out)
        down, up, scale = tensors[t]
        sd |= {f"{kohya(t)}.lora_down.weight": down, f"{kohya(t)}.lora_up.weight": up,
               f"{kohya(t)}.dora_scale": scale, f"{kohya(t)}.alpha": torch.tensor(2.0)}
    path = tmp_path / "dora.safetensors"
    save_file(sd, path)

    base.loras.add("d", path, weight=0.7)
    for t in cases:
        down, up, scale = tensors[t]
        torch.testing.assert_close(weight(base.unet, t), lycoris64(w0[t], down, up, scale, 0.5, 0.7),
                                   rtol=1e-5, atol=1e-6)
    # the other axis gives another weight: the test would see a mix-up
    down, up, scale = tensors[ATTN]
    wrong = lycoris64(w0[ATTN], down, up, scale.reshape(-1, 1), 0.5, 0.7)
    assert (weight(base.unet, ATTN) - wrong).abs().max() > 1e-3
    removed_and_described(base, "d", w0, path, "dora", "DoRA")


def test_lycoris_per_row_dora_converts_to_diffusers_and_fuses_as_sdtune_applies_it(base, tmp_path):
    """A per-output-row dora_scale (LyCORIS's wd_on_output) is PEFT's axis: ``sdtune convert --to diffusers`` writes
    it as lora_magnitude_vector, and diffusers' fuse gives sdtune's weights (PEFT adds no eps to the norm: a
    float32-rounding difference); a per-column one stays refused, naming the axes."""
    g = torch.Generator().manual_seed(13)
    w0 = {t: weight(base.unet, t) for t in (ATTN, CONV)}
    sd, tensors = {}, {}
    for t in w0:
        tensors[t] = lycoris_tensors(w0[t], g, per_out=True)
        down, up, scale = tensors[t]
        sd |= {f"{kohya(t)}.lora_down.weight": down, f"{kohya(t)}.lora_up.weight": up,
               f"{kohya(t)}.dora_scale": scale, f"{kohya(t)}.alpha": torch.tensor(2.0)}
    save_file(sd, tmp_path / "rows.safetensors")
    out = tmp_path / "pytorch_lora_weights.safetensors"
    formats.convert(tmp_path / "rows.safetensors", out, to="diffusers")
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor(f"unet.{ATTN}.lora_magnitude_vector").shape == (32,)
        assert f.get_tensor(f"unet.{CONV}.lora_magnitude_vector").shape == (1, 64, 1, 1)
    pipe = base.pipeline()
    pipe.load_lora_weights(str(out), adapter_name="d")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["d"])
    pipe.unload_lora_weights()
    for t in w0:
        down, up, scale = tensors[t]
        torch.testing.assert_close(weight(base.unet, t), lycoris64(w0[t], down, up, scale, 0.5, 1.0),
                                   rtol=1e-5, atol=1e-5)
    column = {k: v for k, v in sd.items() if not k.endswith("dora_scale")}
    column[f"{kohya(ATTN)}.dora_scale"] = torch.rand(1, 32, generator=g) + 0.5
    column[f"{kohya(CONV)}.dora_scale"] = torch.rand(1, 32, 1, 1, generator=g) + 0.5
    save_file(column, tmp_path / "columns.safetensors")
    with pytest.raises(SdtuneError, match="a kohya/LyCORIS DoRA normalises other axes than PEFT's"):
        formats.convert(tmp_path / "columns.safetensors", tmp_path / "c.safetensors", to="diffusers")


def test_dora_with_an_additive_lora_on_the_same_layer(base, tmp_path):
    """Order: every adapter's change is taken from the pristine W0 and the changes are summed (A1111's order),
    so the DoRA's magnitude is that of W0 plus its own LoRA, and the result is independent of adding order."""
    g = torch.Generator().manual_seed(5)
    w0 = weight(base.unet, ATTN)
    down, up, scale = lycoris_tensors(w0, g)
    save_file({f"{kohya(ATTN)}.lora_down.weight": down, f"{kohya(ATTN)}.lora_up.weight": up,
               f"{kohya(ATTN)}.dora_scale": scale}, tmp_path / "dora.safetensors")
    ld, lu = torch.randn(2, 32, generator=g) * 0.3, torch.randn(32, 2, generator=g) * 0.3
    save_file({f"{kohya(ATTN)}.lora_down.weight": ld, f"{kohya(ATTN)}.lora_up.weight": lu,
               f"{kohya(ATTN)}.alpha": torch.tensor(1.0)}, tmp_path / "lora.safetensors")

    dora_change = lycoris64(w0, down, up, scale, 1.0, 0.8).to(D) - w0.to(D)
    expected = (w0.to(D) + 0.5 * 0.5 * (lu.to(D) @ ld.to(D)) + dora_change).float()
    for first, second in (("a", "b"), ("b", "a")):
        base.loras.add(first, tmp_path / "dora.safetensors", weight=0.8)
        base.loras.add(second, tmp_path / "lora.safetensors", weight=0.5)
        torch.testing.assert_close(weight(base.unet, ATTN), expected, rtol=1e-5, atol=1e-6)
        base.loras.remove_all()
        assert torch.equal(weight(base.unet, ATTN), w0)


# ---------------------------------------------------------------- files: round trip, bad input

def test_kohya_dora_round_trips_and_peft_dora_refuses_kohya(base, tmp_path):
    g = torch.Generator().manual_seed(6)
    down, up, scale = lycoris_tensors(weight(base.unet, ATTN), g)
    save_file({f"{kohya(ATTN)}.lora_down.weight": down, f"{kohya(ATTN)}.lora_up.weight": up,
               f"{kohya(ATTN)}.dora_scale": scale, f"{kohya(ATTN)}.alpha": torch.tensor(3.0)}, tmp_path / "a.safetensors")
    lora = formats.convert(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    again = formats.load_lora(tmp_path / "b.safetensors")
    a, b = lora.modules["unet"][ATTN], again.modules["unet"][ATTN]
    assert b.kind == "dora" and b.alpha == 3.0 and set(b.tensors) == {"down", "up", "dora_scale"}
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    # kohya's dora_scale is per input column, PEFT's magnitude per output row: no diffusers layout for it
    with pytest.raises(SdtuneError, match=r"DoRA adapters have no layout that diffusers loads \(a kohya/LyCORIS "
                                          r"DoRA normalises.*format='kohya'"):
        formats.save_lora(lora, tmp_path / "c.safetensors", format="diffusers")
    with pytest.raises(SdtuneError, match=r"^\S*b\.safetensors: DoRA adapters have no layout that diffusers"):
        formats.convert(tmp_path / "b.safetensors", tmp_path / "c.safetensors", to="diffusers")  # named: the input
    peft_ad = Adapter("dora", {"down": down, "up": up, "magnitude": torch.ones(32)}, 4.0)
    lora.modules["unet"][ATTN] = peft_ad
    with pytest.raises(SdtuneError, match="no kohya layout.*format='diffusers'"):
        formats.save_lora(lora, tmp_path / "c.safetensors")
    formats.save_lora(lora, tmp_path / "c.safetensors", format="diffusers")
    back = formats.load_lora(tmp_path / "c.safetensors").modules["unet"][ATTN]
    assert back.kind == "dora" and back.alpha == 4.0
    assert all(torch.equal(back.tensors[k], v) for k, v in peft_ad.tensors.items())
    # one PEFT config per component: DoRA and plain LoRA layers together cannot be described
    lora.modules["unet"][CONV] = Adapter("lora", {"down": torch.ones(2, 32, 3, 3), "up": torch.ones(64, 2, 1, 1)})
    with pytest.raises(SdtuneError, match="mixes DoRA and plain LoRA"):
        formats.save_lora(lora, tmp_path / "d.safetensors", format="diffusers")


def test_peft_dora_converted_to_diffusers_loads_in_diffusers_as_peft_merges(base, tmp_path):
    """PEFT's folder -> ``sdtune convert --to diffusers`` -> diffusers' load_lora_weights + fuse_lora gives PEFT's
    own merge (lora_magnitude_vector kept, use_dora in the header)."""
    w0 = {t: weight(base.unet, t) for t in (ATTN, CONV)}
    _, expected = peft_dora(base.unet, [ATTN, CONV], seed=4, save_to=tmp_path / "peft")
    out = tmp_path / "pytorch_lora_weights.safetensors"
    formats.convert(tmp_path / "peft" / "adapter_model.safetensors", out, to="diffusers")
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.use_dora"] is True
        assert f"unet.{ATTN}.lora_magnitude_vector" in f.keys()
    pipe = base.pipeline()
    pipe.load_lora_weights(str(out), adapter_name="d")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["d"])
    pipe.unload_lora_weights()
    for t in (ATTN, CONV):
        assert not torch.equal(weight(base.unet, t), w0[t])
        torch.testing.assert_close(weight(base.unet, t), expected[t], rtol=1e-5, atol=1e-6)


def dora64(w0, delta, dora_scale, scale, strength):
    """DoRA on any ΔW in float64, as A1111's generic ``apply_weight_decompose`` (and LyCORIS's LoHa/LoKr with
    dora_wd) computes it: V = W0 + scale·ΔW, renormalised per input column (or per output row for an [out, 1]
    scale) to dora_scale / (its L2 norm + eps); then the strength scales the change from W0."""
    w0 = w0.to(D)
    out, inner = w0.shape[0], w0.shape[1]
    v = w0 + scale * delta.to(D).reshape(w0.shape)
    if dora_scale.shape[0] == 1:
        norm = ((v ** 2).transpose(0, 1).reshape(inner, -1).sum(1).sqrt() + EPS).reshape(1, inner, *[1] * (w0.dim() - 2))
    else:
        norm = ((v ** 2).reshape(out, -1).sum(1).sqrt() + EPS).reshape(out, *[1] * (w0.dim() - 1))
    return (w0 + strength * (v * dora_scale.to(D).reshape(norm.shape) / norm - w0)).float()


def test_dora_on_loha_and_lokr(base, tmp_path):
    """LyCORIS's dora_wd on LoHa (per input column, a conv and a linear layer) and LoKr (per output row, LyCORIS's
    wd_on_out; and a whole 4-D w2 on a conv): each against ``dora64`` on the ΔW computed here in float64."""
    g = torch.Generator().manual_seed(11)
    to_k = ATTN.replace("to_q", "to_k")
    w0 = {t: weight(base.unet, t) for t in (ATTN, CONV, to_k)}
    sd, want = {}, {}
    for t in (ATTN, CONV):  # LoHa, rank 4, alpha 2
        out, inner = w0[t].shape[0], w0[t][0].numel()
        f = {n: torch.randn(shape, generator=g) * 0.3 for n, shape in (
            ("hada_w1_a", (out, 4)), ("hada_w1_b", (4, inner)), ("hada_w2_a", (out, 4)), ("hada_w2_b", (4, inner)))}
        delta = (f["hada_w1_a"].to(D) @ f["hada_w1_b"].to(D)) * (f["hada_w2_a"].to(D) @ f["hada_w2_b"].to(D))
        _, _, scale = lycoris_tensors(w0[t], g)
        sd |= {f"{kohya(t)}.{n}": v for n, v in f.items()} | {f"{kohya(t)}.dora_scale": scale,
                                                             f"{kohya(t)}.alpha": torch.tensor(2.0)}
        want[t] = (delta, scale, 0.5)
    w1, w2 = torch.randn(4, 4, generator=g) * 0.3, torch.randn(8, 8, generator=g) * 0.3  # LoKr, whole factors
    _, _, scale = lycoris_tensors(w0[to_k], g, per_out=True)
    sd |= {f"{kohya(to_k)}.lokr_w1": w1, f"{kohya(to_k)}.lokr_w2": w2, f"{kohya(to_k)}.dora_scale": scale}
    want[to_k] = (torch.kron(w1.to(D), w2.to(D)), scale, 1.0)
    path = tmp_path / "doha.safetensors"
    save_file(sd, path)
    lora = formats.load_lora(path)
    assert {p: ad.kind for _, p, ad in lora.items()} == {ATTN: "dora-loha", CONV: "dora-loha", to_k: "dora-lokr"}
    base.loras.add("d", path, weight=0.8)
    for t, (delta, scale, s) in want.items():
        torch.testing.assert_close(weight(base.unet, t), dora64(w0[t], delta, scale, s, 0.8), rtol=1e-5, atol=1e-6)
    base.loras.remove("d")
    assert all(torch.equal(weight(base.unet, t), w0[t]) for t in w0)
    # a conv LoKr with a whole 4-D w2 (the kernel is its), per input column
    conv_w0 = w0[CONV]
    w1, w2 = torch.randn(4, 4, generator=g) * 0.3, torch.randn(16, 8, 3, 3, generator=g) * 0.3
    _, _, scale = lycoris_tensors(conv_w0, g)
    save_file({f"{kohya(CONV)}.lokr_w1": w1, f"{kohya(CONV)}.lokr_w2": w2, f"{kohya(CONV)}.dora_scale": scale},
              tmp_path / "dokr.safetensors")
    base.loras.add("k", tmp_path / "dokr.safetensors", weight=-0.5)
    torch.testing.assert_close(weight(base.unet, CONV),
                               dora64(conv_w0, torch.kron(w1.to(D), w2.to(D).flatten(1)), scale, 1.0, -0.5),
                               rtol=1e-5, atol=1e-6)
    base.loras.remove("k")
    # they round-trip in the kohya layout with LyCORIS's metadata, and are named
    formats.convert(path, tmp_path / "again.safetensors")
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd)
        assert json.loads(f.metadata()["ss_network_args"])["dora_wd"] == "True"
    info = describe(path)
    assert info["kinds"] == {"dora-loha": 2, "dora-lokr": 1} and info["lycoris"] == "LoHa + DoRA, LoKr + DoRA"
    with pytest.raises(SdtuneError, match=r"LoHa \+ DoRA/LoKr \+ DoRA adapters have no layout that diffusers loads"):
        formats.convert(path, tmp_path / "d.safetensors", to="diffusers")


def test_misshapen_dora_scale_is_one_clear_error(base, tmp_path):
    g = torch.Generator().manual_seed(7)
    down, up, _ = lycoris_tensors(weight(base.unet, CONV), g)
    save_file({f"{kohya(CONV)}.lora_down.weight": down, f"{kohya(CONV)}.lora_up.weight": up,
               f"{kohya(CONV)}.dora_scale": torch.ones(1, 7, 1, 1)}, tmp_path / "bad.safetensors")
    with pytest.raises(SdtuneError) as err:
        base.loras.add("bad", tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value) and "dora_scale" in str(err.value) and len(base.loras) == 0


# ---------------------------------------------------------------- OFT/BOFT: float64 oracles (PEFT has no such layout)

def oft64(w0, blocks, alpha, strength):
    """kohya/LyCORIS OFT written out in float64: Q = B − Bᵀ, shrunk to norm alpha·out if larger, R_j =
    (I + Q_j)(I − Q_j)⁻¹ by explicit inverse, R the block-diagonal of them, W' = Rᵀ·W0; then A1111's strength."""
    out = w0.shape[0]
    q = blocks.to(D) - blocks.to(D).transpose(1, 2)
    norm, bound = q.flatten().norm(), alpha * out
    if alpha and norm > bound:
        q = q * bound / norm
    eye = torch.eye(q.shape[1], dtype=D)
    r = torch.block_diag(*[(eye + qj) @ torch.linalg.inv(eye - qj) for qj in q])
    assert torch.allclose(r.T @ r, torch.eye(out, dtype=D))  # orthogonal: the oracle's own check
    rotated = (r.T @ w0.to(D).reshape(out, -1)).reshape(w0.shape)
    return (w0.to(D) + strength * (rotated - w0.to(D))).float()


def test_oft_blocks_rotate_output_rows_with_and_without_the_constraint(base, tmp_path):
    g = torch.Generator().manual_seed(8)
    # ATTN: 4 blocks of 8, a large constraint (never reached); CONV: 8 blocks of 8 (64 rows), clamped hard
    cases = {ATTN: (4, 10.0), CONV: (8, 1e-3)}
    w0 = {t: weight(base.unet, t) for t in cases}
    sd, blocks = {}, {}
    for t, (k, alpha) in cases.items():
        blocks[t] = torch.randn(k, 8, 8, generator=g) * 0.1
        sd |= {f"{kohya(t)}.oft_blocks": blocks[t], f"{kohya(t)}.alpha": torch.tensor(alpha)}
    path = tmp_path / "oft.safetensors"
    save_file(sd, path)
    q = blocks[CONV] - blocks[CONV].transpose(1, 2)
    assert q.norm() > 1e-3 * 64  # the clamp is exercised

    base.loras.add("o", path, weight=0.6)
    for t, (_, alpha) in cases.items():
        torch.testing.assert_close(weight(base.unet, t), oft64(w0[t], blocks[t], alpha, 0.6), rtol=1e-5, atol=1e-6)
    base.loras.set_weights({"o": 1.0})
    for t, (_, alpha) in cases.items():
        torch.testing.assert_close(weight(base.unet, t), oft64(w0[t], blocks[t], alpha, 1.0), rtol=1e-5, atol=1e-6)
    removed_and_described(base, "o", w0, path, "oft", "OFT", {8: 2})

    lora = formats.convert(path, tmp_path / "again.safetensors")  # kohya out, same tensors and constraint
    again = formats.load_lora(tmp_path / "again.safetensors")
    for t, (_, alpha) in cases.items():
        ad = again.modules["unet"][t]
        assert ad.kind == "oft" and ad.alpha == pytest.approx(alpha) and torch.equal(ad.tensors["blocks"], blocks[t])
    with pytest.raises(SdtuneError, match="format='kohya'"):
        formats.save_lora(lora, tmp_path / "d.safetensors", format="diffusers")


def test_oft_with_dora_and_lora_on_one_layer_sums_changes_from_w0(base, tmp_path):
    g = torch.Generator().manual_seed(9)
    w0 = weight(base.unet, ATTN)
    blocks = torch.randn(4, 8, 8, generator=g) * 0.1
    save_file({f"{kohya(ATTN)}.oft_blocks": blocks, f"{kohya(ATTN)}.alpha": torch.tensor(0.0)},
              tmp_path / "oft.safetensors")
    down, up, scale = lycoris_tensors(w0, g)
    save_file({f"{kohya(ATTN)}.lora_down.weight": down, f"{kohya(ATTN)}.lora_up.weight": up,
               f"{kohya(ATTN)}.dora_scale": scale}, tmp_path / "dora.safetensors")
    ld, lu = torch.randn(2, 32, generator=g) * 0.3, torch.randn(32, 2, generator=g) * 0.3
    save_file({f"{kohya(ATTN)}.lora_down.weight": ld, f"{kohya(ATTN)}.lora_up.weight": lu},
              tmp_path / "lora.safetensors")

    expected = (w0.to(D) + 0.5 * (lu.to(D) @ ld.to(D)) + (oft64(w0, blocks, 0.0, 0.7).to(D) - w0.to(D))
                + (lycoris64(w0, down, up, scale, 1.0, 0.9).to(D) - w0.to(D))).float()
    with base.loras.batch():
        base.loras.add("oft", tmp_path / "oft.safetensors", weight=0.7)
        base.loras.add("dora", tmp_path / "dora.safetensors", weight=0.9)
        base.loras.add("lora", tmp_path / "lora.safetensors", weight=0.5)
    torch.testing.assert_close(weight(base.unet, ATTN), expected, rtol=1e-5, atol=2e-6)
    base.loras.remove_all()
    assert torch.equal(weight(base.unet, ATTN), w0)


def butterfly64(w0, blocks, alpha, strength, rescale=None):
    """LyCORIS BOFT written out in float64 with explicit matrices: each stage's R_i blocks (Cayley of B − Bᵀ, one
    norm constraint alpha·out over every stage) made into a block-diagonal matrix, conjugated by the permutation
    that lists rows as (c, g, j) -> (c, j, g) with j < 2^i·b/2, so that row pairs 2^i·b/2 apart share a block;
    W' = S_{m-1} … S_0 · W0, times rescale per row, then A1111's strength."""
    m, k, b, _ = blocks.shape
    out = k * b
    q = blocks.to(D) - blocks.to(D).transpose(-1, -2)
    norm, bound = q.flatten().norm(), alpha * out
    if alpha and norm > bound:
        q = q * bound / norm
    eye = torch.eye(b, dtype=D)
    total = torch.eye(out, dtype=D)
    for i in range(m):
        half = 2 ** i * b // 2
        order = [c * 2 * half + g * half + j for c in range(out // (2 * half)) for j in range(half) for g in range(2)]
        perm = torch.zeros(out, out, dtype=D)
        for new, old in enumerate(order):  # (perm @ x)[new] = x[old]
            perm[new, old] = 1
        stage = torch.block_diag(*[(eye + qj) @ torch.linalg.inv(eye - qj) for qj in q[i]])
        total = perm.T @ stage @ perm @ total
    assert torch.allclose(total.T @ total, torch.eye(out, dtype=D))  # orthogonal: the oracle's own check
    rotated = (total @ w0.to(D).reshape(out, -1)).reshape(w0.shape)
    if rescale is not None:
        rotated = rotated * rescale.to(D).reshape(out, *[1] * (w0.dim() - 1))
    return (w0.to(D) + strength * (rotated - w0.to(D))).float()


def test_boft_butterfly_with_constraint_and_rescale(base, tmp_path):
    g = torch.Generator().manual_seed(10)
    # ATTN: 32 rows = 4 blocks of 8 in 3 stages (pairs 4, 8, 16 rows apart), free; CONV: 64 rows = 16 blocks of 4 in
    # 2 stages, clamped, with a rescale
    cases = {ATTN: ((3, 4, 8, 8), 0.0, None), CONV: ((2, 16, 4, 4), 1e-3, 1 + 0.2 * torch.randn(64, 1, 1, 1,
                                                                                           generator=g))}
    w0 = {t: weight(base.unet, t) for t in cases}
    sd, blocks = {}, {}
    for t, (shape, alpha, rescale) in cases.items():
        blocks[t] = torch.randn(*shape, generator=g) * 0.1
        sd |= {f"{kohya(t)}.oft_blocks": blocks[t], f"{kohya(t)}.alpha": torch.tensor(alpha)}
        if rescale is not None:
            sd[f"{kohya(t)}.rescale"] = rescale
    save_file(sd, tmp_path / "boft.safetensors")
    q = blocks[CONV] - blocks[CONV].transpose(-1, -2)
    assert q.norm() > 1e-3 * 64  # the clamp is exercised
    for strength in (1.0, 0.4):
        base.loras.add("b", tmp_path / "boft.safetensors", weight=strength)
        for t, (_, alpha, rescale) in cases.items():
            torch.testing.assert_close(weight(base.unet, t), butterfly64(w0[t], blocks[t], alpha, strength, rescale),
                                       rtol=1e-5, atol=1e-6)
    removed_and_described(base, "b", w0, tmp_path / "boft.safetensors", "oft", "BOFT", {4: 1, 8: 1})
    formats.convert(tmp_path / "boft.safetensors", tmp_path / "again.safetensors")  # kohya out, same tensors
    again = formats.load_lora(tmp_path / "again.safetensors")
    assert torch.equal(again.modules["unet"][CONV].tensors["rescale"], cases[CONV][2])
    assert torch.equal(again.modules["unet"][ATTN].tensors["blocks"], blocks[ATTN])


def test_oft_diag_is_the_rotation_itself(base, tmp_path):
    """Older LyCORIS files store R (``oft_diag``): used as it is, W' = Rᵀ·W0 per block (A1111's is_R)."""
    g = torch.Generator().manual_seed(11)
    w0 = weight(base.unet, ATTN)
    r = torch.linalg.qr(torch.randn(4, 8, 8, generator=g, dtype=D))[0]  # any orthogonal blocks
    save_file({f"{kohya(ATTN)}.oft_diag": r.float().contiguous()}, tmp_path / "diag.safetensors")
    base.loras.add("d", tmp_path / "diag.safetensors", weight=0.5)
    big = torch.block_diag(*r.float().to(D))
    expected = (w0.to(D) + 0.5 * (big.T @ w0.to(D) - w0.to(D))).float()
    torch.testing.assert_close(weight(base.unet, ATTN), expected, rtol=1e-5, atol=1e-6)
    removed_and_described(base, "d", {ATTN: w0}, tmp_path / "diag.safetensors", "oft", "OFT", {8: 1})


def test_kohya_networks_oft_file_applies_and_converts_to_the_lycoris_layout(base, tmp_path):
    """kohya's own ``networks.oft`` names its UNet modules ``oft_unet_…`` (its network_dim is the number of blocks,
    its network_alpha the constraint, 1e-3 by default): read as A1111 reads them, the same math as LyCORIS's."""
    g = torch.Generator().manual_seed(12)
    to_k = ATTN.replace("to_q", "to_k")
    w0 = {t: weight(base.unet, t) for t in (ATTN, to_k)}
    blocks = {t: torch.randn(4, 8, 8, generator=g) * 0.01 for t in w0}  # dim 4: 4 blocks of a 32-wide layer
    sd = {}
    for t in w0:
        key = "oft_unet_" + t.replace(".", "_")
        sd |= {f"{key}.oft_blocks": blocks[t], f"{key}.alpha": torch.tensor(1e-3)}
    path = tmp_path / "kohya_oft.safetensors"
    save_file(sd, path, {"ss_network_module": "networks.oft", "ss_network_dim": "4", "ss_network_alpha": "0.001"})
    assert (blocks[ATTN] - blocks[ATTN].transpose(1, 2)).norm() > 1e-3 * 32  # kohya's default constraint acts

    base.loras.add("k", path, weight=0.7)
    for t in w0:
        torch.testing.assert_close(weight(base.unet, t), oft64(w0[t], blocks[t], 1e-3, 0.7), rtol=1e-5, atol=1e-6)
    removed_and_described(base, "k", w0, path, "oft", "OFT", {8: 2})
    assert describe(path)["format"] == "kohya-oft"

    formats.convert(path, tmp_path / "lycoris.safetensors")  # the layout A1111, ComfyUI and LyCORIS read
    with safe_open(tmp_path / "lycoris.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(k.replace("oft_unet_", "lora_unet_") for k in sd)
        meta = f.metadata()  # what loads it in kohya's LyCORIS loader, no longer networks.oft
        assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "diag-oft"
        for k, v in sd.items():
            assert torch.equal(f.get_tensor(k.replace("oft_unet_", "lora_unet_")), v)


def test_misshapen_oft_blocks_are_one_clear_error(base, tmp_path):
    bad = {"rows": torch.zeros(3, 8, 8),  # 24 rows for a 32-row layer
           "butterfly": torch.zeros(3, 2, 8, 8),  # 3 stages need blocks in multiples of 4
           "odd": torch.zeros(2, 4, 7, 7)}  # BOFT blocks pair rows: an even size
    for name, blocks in bad.items():
        save_file({f"{kohya(ATTN)}.oft_blocks": blocks}, tmp_path / f"{name}.safetensors")
        with pytest.raises(SdtuneError) as err:
            base.loras.add(name, tmp_path / f"{name}.safetensors")
        assert "\n" not in str(err.value) and len(base.loras) == 0
