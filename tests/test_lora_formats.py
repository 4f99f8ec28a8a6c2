"""Every LoRA layout sdtune reads, built here key by key from the tiny model's module list, and the writers.

Expected ΔW values are computed in this file from the raw factors with each layout's own formula (kohya
alpha/rank, PEFT lora_alpha/r with patterns, LyCORIS Hadamard/Kronecker/Tucker, sequential LoCon convs), never
through sdtune's ``Adapter.delta`` alone.
"""

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune import families
from sdtune.ldm import unet_module_map
from sdtune.lora import formats, inspect, keys
from sdtune.lora.neutral import Adapter, Lora
from sdtune.safeio import SdtuneError
from sdtune.tiny import model as tiny

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
UNET_LINEAR = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn1.to_out.0", f"{ATTN}.attn2.to_k", f"{ATTN}.ff.net.0.proj",
               f"{ATTN}.ff.net.2", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
               "up_blocks.1.resnets.0.time_emb_proj"]
UNET_CONV1 = ["down_blocks.0.attentions.0.proj_in", "up_blocks.2.attentions.1.proj_out"]
UNET_CONV3 = ["down_blocks.1.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"]
TEXT = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.2.mlp.fc1"]


@pytest.fixture(scope="module")
def parts():
    return tiny.build(seed=3)


@pytest.fixture(scope="module")
def shapes(parts):
    return {c: keys.weight_shapes(parts[c]) for c in ("unet", "text_encoder")}


@pytest.fixture(scope="module")
def model_keys(shapes):
    return {c: set(t) for c, t in shapes.items()}


def _factors(shape, rank, g):
    """kohya/PEFT factor shapes: linear [r, in] / [out, r]; conv [r, in, kh, kw] / [out, r, 1, 1]."""
    if len(shape) == 4:
        return (torch.randn(rank, *shape[1:], generator=g) * 0.2, torch.randn(shape[0], rank, 1, 1, generator=g) * 0.2)
    return torch.randn(rank, shape[1], generator=g) * 0.2, torch.randn(shape[0], rank, generator=g) * 0.2


def _lora_delta(down, up, alpha, shape):
    rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape) * scale


def _plan(shapes):
    """(component, path, shape, rank, alpha) for a spread of layer kinds; alphas differ from ranks."""
    rows, alphas = [], [1.0, 6.0, None, 2.5, 16.0]
    paths = [("unet", p) for p in UNET_LINEAR + UNET_CONV1 + UNET_CONV3] + [("text_encoder", p) for p in TEXT]
    for i, (comp, p) in enumerate(paths):
        rows.append((comp, p, shapes[comp][p], 2 + i % 3, alphas[i % len(alphas)]))
    return rows


def _kohya_sd(shapes, seed=0, te_prefix="lora_te_", ldm_names=None, with_alpha=True):
    g = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for comp, p, shape, rank, alpha in _plan(shapes):
        if comp == "unet":
            name = "lora_unet_" + (ldm_names[p] if ldm_names else p).replace(".", "_")
        else:
            name = te_prefix + "text_model_" + p.replace(".", "_")
        down, up = _factors(shape, rank, g)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None and with_alpha:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        expected[(comp, p)] = _lora_delta(down, up, alpha if with_alpha else None, shape)
    return sd, expected


def _assert_deltas(lora, expected, shapes, exact=False):
    assert {(c, p) for c, p, _ in lora.items()} == set(expected)
    for (comp, p), want in expected.items():
        got = lora.modules[comp][p].delta(shapes[comp][p])
        if exact:
            assert torch.equal(got, want), p
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=p)


# ------------------------------------------------------------------ kohya

def test_kohya_diffusers_names_with_alphas(shapes, model_keys):
    sd, expected = _kohya_sd(shapes)
    lora = formats.from_state_dict(sd, {"ss_network_dim": "4"}, model_keys=model_keys)
    assert lora.format == "kohya" and not lora.unknown
    _assert_deltas(lora, expected, shapes)
    # ambiguous underscores resolved to real modules
    assert f"{ATTN}.attn1.to_out.0" in lora.modules["unet"] and f"{ATTN}.ff.net.0.proj" in lora.modules["unet"]
    assert lora.modules["unet"][UNET_LINEAR[0]].alpha == 1.0
    assert lora.modules["unet"]["down_blocks.0.attentions.0.proj_in"].alpha is None  # missing alpha = rank


def test_kohya_without_model_keys_uses_sd15_structure(shapes):
    sd, expected = _kohya_sd(shapes, seed=1)
    _assert_deltas(formats.from_state_dict(sd), expected, shapes)


def test_kohya_ldm_names_and_te1_prefix(parts, shapes, model_keys):
    ldm_of = {d: l for l, d in unet_module_map(parts["unet"].config).items()}
    sd, expected = _kohya_sd(shapes, seed=2, te_prefix="lora_te1_", ldm_names=ldm_of)
    assert any(k.startswith("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0") for k in sd)
    lora = formats.from_state_dict(sd, model_keys=model_keys)
    _assert_deltas(lora, expected, shapes)
    assert keys.match(lora, shapes).ok


def test_kohya_ldm_names_on_sd15():
    ref = keys.reference(families.SD1)
    r, g = 4, torch.Generator().manual_seed(0)
    sd = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(r, 640, generator=g),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, r, generator=g),
        "lora_unet_middle_block_1_proj_in.lora_down.weight": torch.randn(r, 1280, 1, 1, generator=g),
        "lora_unet_middle_block_1_proj_in.lora_up.weight": torch.randn(1280, r, 1, 1, generator=g),
        "lora_unet_output_blocks_3_0_in_layers_2.lora_down.weight": torch.randn(r, 2560, 3, 3, generator=g),
        "lora_unet_output_blocks_3_0_in_layers_2.lora_up.weight": torch.randn(1280, r, 1, 1, generator=g),
    }
    lora = formats.from_state_dict(sd)
    assert set(lora.modules["unet"]) == {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                         "mid_block.attentions.0.proj_in", "up_blocks.1.resnets.0.conv1"}
    assert keys.match(lora, ref).ok


def test_locon_tucker_mid_matches_sequential_convs(shapes, model_keys):
    """kohya/LyCORIS LoCon with lora_mid: ΔW applied as one conv equals down -> mid -> up applied in turn."""
    g = torch.Generator().manual_seed(4)
    p = "down_blocks.1.resnets.0.conv1"
    out_ch, in_ch, kh, kw = shapes["unet"][p]
    r, alpha = 3, 5.0
    down = torch.randn(r, in_ch, 1, 1, generator=g)
    mid = torch.randn(r, r, kh, kw, generator=g)
    up = torch.randn(out_ch, r, 1, 1, generator=g)
    name = "lora_unet_" + p.replace(".", "_")
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
          f"{name}.alpha": torch.tensor(alpha)}
    lora = formats.from_state_dict(sd, model_keys=model_keys)
    # in float64: one folded conv and three in turn sum in different orders, which float32 rounds to ~1e-4
    # on outputs of size ~600; float64 leaves ~1e-12, so the default float64 tolerance (1e-7) tests the algebra
    x = torch.randn(2, in_ch, 9, 9, generator=g, dtype=torch.float64)
    want = F.conv2d(F.conv2d(F.conv2d(x, down.double()), mid.double(), padding=1), up.double()) * (alpha / r)
    got = F.conv2d(x, lora.modules["unet"][p].delta((out_ch, in_ch, kh, kw), dtype=torch.float64), padding=1)
    torch.testing.assert_close(got, want)
    assert keys.match(lora, shapes).ok


# ------------------------------------------------------------------ diffusers / PEFT

def _peft_sd(shapes, prefix_for, seed=5, style="peft"):
    g = torch.Generator().manual_seed(seed)
    sd, factors = {}, {}
    for comp, p, shape, rank, _ in _plan(shapes):
        down, up = _factors(shape, rank, g)
        key = prefix_for(comp) + p
        a, b = {"peft": ("lora_A.weight", "lora_B.weight"), "old": ("lora.down.weight", "lora.up.weight")}[style]
        sd[f"{key}.{a}"], sd[f"{key}.{b}"] = down, up
        factors[(comp, p)] = (down, up, shape)
    return sd, factors


def _peft_expected(factors, r_default, alpha_default, alpha_pattern=(), rank_pattern=()):
    """PEFT: scale = alpha / r with the first matching (suffix regex) pattern, per module."""
    out = {}
    for (comp, p), (down, up, shape) in factors.items():
        alpha = next((v for k, v in alpha_pattern if re.match(rf"(.*\.)?({k})$", p)), alpha_default)
        r = next((v for k, v in rank_pattern if re.match(rf"(.*\.)?({k})$", p)), down.shape[0])
        out[(comp, p)] = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape) * (alpha / r)
    return out


def test_diffusers_prefixed_with_header_patterns(shapes):
    sd, factors = _peft_sd(shapes, lambda c: "unet." if c == "unet" else "text_encoder.text_model.")
    ranks = {c: {re.escape(p): d.shape[0] for (cc, p), (d, _, _) in factors.items() if cc == c and d.shape[0] != 4}
             for c in ("unet", "text_encoder")}
    header = {"unet.r": 4, "unet.lora_alpha": 3.0, "unet.alpha_pattern": {"attn1.to_q": 7.0, "proj_in": 0.5},
              "unet.rank_pattern": ranks["unet"], "text_encoder.r": 4, "text_encoder.lora_alpha": 9.0,
              "text_encoder.rank_pattern": ranks["text_encoder"]}
    lora = formats.from_state_dict(sd, {"lora_adapter_metadata": json.dumps(header)})
    assert lora.format == "diffusers"
    unet_f = {k: v for k, v in factors.items() if k[0] == "unet"}
    te_f = {k: v for k, v in factors.items() if k[0] == "text_encoder"}
    expected = _peft_expected(unet_f, 4, 3.0, alpha_pattern=[("attn1.to_q", 7.0), ("proj_in", 0.5)])
    expected |= _peft_expected(te_f, 4, 9.0)
    _assert_deltas(lora, expected, shapes)


def test_peft_unprefixed_header_and_alpha_keys(shapes):
    sd, factors = _peft_sd(shapes, lambda c: "" if c == "unet" else "text_model.", seed=6)
    # PEFT patterns are suffixes of the module name (regexes): here the last three path components
    rank_pattern = {re.escape(".".join(p.split(".")[-3:])): d.shape[0] for (_, p), (d, _, _) in factors.items()
                    if d.shape[0] != 3}
    header = {"r": 3, "lora_alpha": 16, "rank_pattern": rank_pattern, "target_modules": ["to_q"]}
    lora = formats.from_state_dict(sd, {"lora_adapter_metadata": json.dumps(header)})
    assert lora.format == "peft"
    _assert_deltas(lora, _peft_expected(factors, 3, 16.0), shapes)
    # explicit .alpha keys (diffusers-converted kohya files) win over everything
    key = f"unet.{UNET_LINEAR[0]}"
    sd2 = {("unet." + k if not k.startswith("text_model.") else "text_encoder." + k): v for k, v in sd.items()}
    sd2[f"{key}.alpha"] = torch.tensor(1.5)
    lora2 = formats.from_state_dict(sd2)
    assert lora2.modules["unet"][UNET_LINEAR[0]].alpha == 1.5
    assert lora2.modules["unet"][UNET_LINEAR[1]].alpha is None  # no header: scale 1


def test_old_diffusers_and_processor_keys(shapes):
    sd, factors = _peft_sd(shapes, lambda c: "unet." if c == "unet" else "text_encoder.text_model.", style="old")
    lora = formats.from_state_dict(sd)
    assert lora.format == "diffusers-old"
    _assert_deltas(lora, {k: _lora_delta(d, u, None, s) for k, (d, u, s) in factors.items()}, shapes)

    g = torch.Generator().manual_seed(7)
    proc, want = {}, {}
    for attn in (f"{ATTN}.attn1", f"{ATTN}.attn2"):
        for short, target in (("to_q", "to_q"), ("to_k", "to_k"), ("to_out", "to_out.0")):
            shape = shapes["unet"][f"{attn}.{target}"]
            down, up = _factors(shape, 4, g)
            proc[f"{attn}.processor.{short}_lora.down.weight"] = down
            proc[f"{attn}.processor.{short}_lora.up.weight"] = up
            want[("unet", f"{attn}.{target}")] = _lora_delta(down, up, None, shape)
    te_shape = shapes["text_encoder"]["encoder.layers.0.self_attn.q_proj"]
    down, up = _factors(te_shape, 2, g)
    proc["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"] = down
    proc["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight"] = up
    want[("text_encoder", "encoder.layers.0.self_attn.q_proj")] = _lora_delta(down, up, None, te_shape)
    lora = formats.from_state_dict(proc)
    _assert_deltas(lora, want, shapes, exact=True)


def test_raw_peft_with_adapter_config_beside(tmp_path, shapes):
    g = torch.Generator().manual_seed(8)
    sd, factors = {}, {}
    for p in TEXT:
        down, up = _factors(shapes["text_encoder"][p], 4, g)
        sd[f"base_model.model.text_model.{p}.lora_A.weight"] = down
        sd[f"base_model.model.text_model.{p}.lora_B.weight"] = up
        factors[("text_encoder", p)] = (down, up, shapes["text_encoder"][p])
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 12, "rank_pattern": {}, "alpha_pattern": {"fc1": 2}}))
    lora = formats.load_lora(tmp_path)  # the folder: finds adapter_model.safetensors and its config
    assert lora.format == "peft" and set(lora.modules["text_encoder"]) == set(TEXT)
    _assert_deltas(lora, _peft_expected(factors, 4, 12.0, alpha_pattern=[("fc1", 2.0)]), shapes)


def test_unrelated_json_beside_is_not_a_peft_config(tmp_path, shapes):
    sd, _ = _peft_sd(shapes, lambda c: "" if c == "unet" else "text_model.", seed=21)
    save_file(sd, str(tmp_path / "style.safetensors"))
    (tmp_path / "style.json").write_text(json.dumps({"description": "A1111 card", "preferred weight": 0.8}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"note": "not a PEFT config"}))
    lora = formats.load_lora(tmp_path / "style.safetensors")
    assert {ad.alpha for _, _, ad in lora.items()} == {None}


# ------------------------------------------------------------------ LyCORIS

def _cp(t, wa, wb):
    """LyCORIS Tucker rebuild: W[p, q, k, l] = Σ t[i, j, k, l] wa[i, p] wb[j, q]."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb).contiguous()


def test_loha_plain_and_tucker(shapes, model_keys):
    g = torch.Generator().manual_seed(9)
    sd, want = {}, {}
    lin = UNET_LINEAR[0]
    out_f, in_f = shapes["unet"][lin]
    r, alpha = 4, 2.0
    w = {n: torch.randn(*s, generator=g) for n, s in
         (("w1a", (out_f, r)), ("w1b", (r, in_f)), ("w2a", (out_f, r)), ("w2b", (r, in_f)))}
    name = "lora_unet_" + lin.replace(".", "_")
    sd |= {f"{name}.hada_w1_a": w["w1a"], f"{name}.hada_w1_b": w["w1b"], f"{name}.hada_w2_a": w["w2a"],
           f"{name}.hada_w2_b": w["w2b"], f"{name}.alpha": torch.tensor(alpha)}
    want[("unet", lin)] = (w["w1a"] @ w["w1b"]) * (w["w2a"] @ w["w2b"]) * (alpha / r)

    conv = UNET_CONV3[0]
    o, i, kh, kw = shapes["unet"][conv]
    t1, t2 = torch.randn(r, r, kh, kw, generator=g), torch.randn(r, r, kh, kw, generator=g)
    a1, b1, a2, b2 = (torch.randn(r, n, generator=g) for n in (o, i, o, i))
    name = "lora_unet_" + conv.replace(".", "_")
    sd |= {f"{name}.hada_t1": t1, f"{name}.hada_t2": t2, f"{name}.hada_w1_a": a1, f"{name}.hada_w1_b": b1,
           f"{name}.hada_w2_a": a2, f"{name}.hada_w2_b": b2, f"{name}.alpha": torch.tensor(1.0)}
    want[("unet", conv)] = _cp(t1, a1, b1) * _cp(t2, a2, b2) * (1.0 / r)
    lora = formats.from_state_dict(sd, model_keys=model_keys)
    assert lora.format == "lycoris-loha"
    assert lora.modules["unet"][conv].rank == r  # Tucker folded without changing the rank (alpha/rank scale)
    _assert_deltas(lora, want, shapes)


def test_lokr_variants(shapes, model_keys):
    g = torch.Generator().manual_seed(10)
    sd, want = {}, {}
    # linear, w1 full + w2 split: scale alpha / rank
    lin = UNET_LINEAR[4]  # ff.net.2: [32, 128]
    out_f, in_f = shapes["unet"][lin]
    w1 = torch.randn(4, 8, generator=g)
    w2a, w2b = torch.randn(out_f // 4, 2, generator=g), torch.randn(2, in_f // 8, generator=g)
    name = "lora_unet_" + lin.replace(".", "_")
    sd |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(1.0)}
    want[("unet", lin)] = torch.kron(w1, w2a @ w2b) * (1.0 / 2)
    # text encoder, both full: scale 1 whatever alpha says
    te = TEXT[0]
    out_f, in_f = shapes["text_encoder"][te]
    w1, w2 = torch.randn(8, 8, generator=g), torch.randn(out_f // 8, in_f // 8, generator=g)
    name = "lora_te_text_model_" + te.replace(".", "_")
    sd |= {f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(3.0)}
    want[("text_encoder", te)] = torch.kron(w1, w2)
    # conv 3x3, w1 split + w2 Tucker
    conv = UNET_CONV3[0]  # [64, 32, 3, 3]
    o, i, kh, kw = shapes["unet"][conv]
    r = 3
    w1a, w1b = torch.randn(4, r, generator=g), torch.randn(r, 4, generator=g)
    t2 = torch.randn(r, r, kh, kw, generator=g)
    w2a, w2b = torch.randn(r, o // 4, generator=g), torch.randn(r, i // 4, generator=g)
    name = "lora_unet_" + conv.replace(".", "_")
    sd |= {f"{name}.lokr_w1_a": w1a, f"{name}.lokr_w1_b": w1b, f"{name}.lokr_t2": t2, f"{name}.lokr_w2_a": w2a,
           f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(6.0)}
    want[("unet", conv)] = torch.kron((w1a @ w1b)[:, :, None, None], _cp(t2, w2a, w2b)) * (6.0 / r)
    lora = formats.from_state_dict(sd, model_keys=model_keys)
    assert lora.format == "lycoris-lokr" and keys.match(lora, shapes).ok
    _assert_deltas(lora, want, shapes)


# ------------------------------------------------------------------ cloneofsimo, embeddings, unknown keys

def test_cloneofsimo_layout_by_module_order(tmp_path, shapes, model_keys):
    targets = keys.cloneofsimo_targets("unet", model_keys["unet"])
    # tiny model: 2 down + 4 up + 1 mid transformer blocks, each attn1 q/k/v/out, ff proj, attn2 q/k/v/out
    assert len(targets) == 7 * 9 and targets[4].endswith("ff.net.0.proj") and targets[-1].startswith("mid_block")
    te_targets = keys.cloneofsimo_targets("text_encoder", model_keys["text_encoder"])
    assert te_targets[:3] == ["encoder.layers.0.self_attn.k_proj", "encoder.layers.0.self_attn.v_proj",
                              "encoder.layers.0.self_attn.q_proj"]
    g = torch.Generator().manual_seed(11)
    sd, meta, want = {}, {"unet": '["GEGLU", "CrossAttention", "Attention"]', "<s1>": "<embed>"}, {}
    for comp, tl in (("unet", targets), ("text_encoder", te_targets)):
        for n, p in enumerate(tl):
            down, up = _factors(shapes[comp][p], 1, g)
            sd[f"{comp}:{n}:down"], sd[f"{comp}:{n}:up"] = down, up
            meta[f"{comp}:{n}:rank"] = "1"
            want[(comp, p)] = _lora_delta(down, up, None, shapes[comp][p])
    sd["<s1>"] = torch.randn(64, generator=g)
    lora = formats.from_state_dict(sd, meta, model_keys=model_keys)
    assert lora.format == "cloneofsimo" and torch.equal(lora.embeddings["<s1>"], sd["<s1>"])
    _assert_deltas(lora, want, shapes, exact=True)
    # lora_diffusion's own .pt: a bare list [up0, down0, up1, ...] of the UNet, read through the safe loader
    pt = tmp_path / "lora_weight.pt"
    torch.save([t for n in range(len(targets)) for t in (sd[f"unet:{n}:up"], sd[f"unet:{n}:down"])], pt)
    from_pt = formats.load_lora(pt, model_keys=model_keys)
    assert from_pt.format == "cloneofsimo" and not from_pt.modules["text_encoder"]
    _assert_deltas(from_pt, {k: v for k, v in want.items() if k[0] == "unet"}, shapes, exact=True)
    # a count that fits no ordering names the layout
    del sd["unet:0:down"], sd["unet:0:up"]
    with pytest.raises(SdtuneError, match="cloneofsimo lora_diffusion"):
        formats.from_state_dict(sd, meta, model_keys=model_keys)


def test_bundled_embeddings_and_pt_through_safe_loader(tmp_path, shapes):
    sd, expected = _kohya_sd(shapes, seed=12)
    sd["bundle_emb.mystyle.string_to_param.*"] = torch.randn(2, 64)
    torch.save(sd, tmp_path / "l.pt")
    lora = formats.load_lora(tmp_path / "l.pt")
    _assert_deltas(lora, expected, shapes)
    assert lora.embeddings["mystyle"].shape == (2, 64)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(SdtuneError, match="refuses to unpickle"):
        formats.load_lora(tmp_path / "evil.pt")


def test_unknown_keys_are_reported_never_dropped(tmp_path, shapes):
    sd, _ = _kohya_sd(shapes, seed=13)
    name = "lora_unet_" + UNET_LINEAR[0].replace(".", "_")
    sd[f"{name}.unknown_suffix"] = torch.ones(1, 32)  # no algorithm claims it
    sd["some_other_thing.weight"] = torch.ones(3)
    sd["lora_unet_down_blocks_7_attentions_0_to_q.lora_down.weight"] = torch.ones(2, 32)  # no up: incomplete
    lora = formats.from_state_dict(sd)
    assert set(lora.unknown) == {f"{name}.unknown_suffix", "some_other_thing.weight",
                                 "lora_unet_down_blocks_7_attentions_0_to_q.lora_down.weight"}
    report = keys.match(lora, shapes)
    assert set(lora.unknown) == set(report.unread) and not report.ok
    with pytest.raises(SdtuneError, match="dora_scale|some_other_thing"):
        report.raise_if_bad(source="x.safetensors")
    with pytest.warns(UserWarning, match="applying only"):
        report.raise_if_bad(allow_partial=True, source="x.safetensors")
    with pytest.raises(SdtuneError, match="could not read"):
        formats.save_lora(lora, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_not_a_lora_messages(tmp_path):
    with pytest.raises(SdtuneError, match="Textual Inversion"):
        formats.from_state_dict({"emb_params": torch.ones(2, 8)}, source="e.safetensors")
    with pytest.raises(SdtuneError, match="full Stable Diffusion checkpoint"):
        formats.from_state_dict({"model.diffusion_model.out.2.weight": torch.ones(2)}, source="m.ckpt")


# ------------------------------------------------------------------ family guess and refusal

def _sd_for(paths_shapes, prefix="lora_unet_"):
    sd = {}
    for p, (o, i) in paths_shapes.items():
        name = prefix + p.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(4, i), torch.zeros(o, 4)
    return sd


def test_sd2_and_sdxl_files_refused_with_family(shapes):
    ref = keys.reference(families.SD1)
    sd2 = _sd_for({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 1024),
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320)})
    report = keys.match(formats.from_state_dict(sd2), ref)
    assert report.family_guess == families.SD2 and report.shape_mismatch and report.matched
    with pytest.raises(SdtuneError, match=r"for SD 2\.x; the model is SD 1\.x") as refused:
        report.raise_if_bad(source="sd2.safetensors")
    # the self-attention layer both families share in name and shape is no reason to offer partial loading
    assert str(refused.value).endswith("; use a LoRA made for this base model")

    xl = _sd_for({"input_blocks.7.1.transformer_blocks.9.attn2.to_k": (1280, 2048)})
    xl |= _sd_for({"text_model.encoder.layers.0.self_attn.q_proj": (1280, 1280)}, prefix="lora_te2_")
    lora = formats.from_state_dict(xl)
    assert "text_encoder_2" in lora.modules and keys.guess_family(lora) == families.SDXL
    # SD 1.5 itself, and the tiny SD-1.x-shaped model (its own family: 64-wide text)
    for model, title in ((ref, "SD 1.x"), (shapes, "the built-in tiny model")):
        with pytest.raises(SdtuneError, match=f"for SDXL; the model is {title}"):
            keys.match(lora, model).raise_if_bad(allow_partial=True, source="xl.safetensors")


def test_match_accepts_module_roots(parts, shapes):
    sd, _ = _kohya_sd(shapes, seed=14)
    lora = formats.from_state_dict(sd)
    by_root = keys.match(lora, {"unet": parts["unet"], "text_encoder": parts["text_encoder"]})
    by_table = keys.match(lora, shapes)
    assert by_root.ok and sorted(by_root.matched) == sorted(by_table.matched) and len(by_root.matched) == len(lora)


# ------------------------------------------------------------------ writing, round trips, convert

def _neutral(shapes, seed=15):
    sd, _ = _kohya_sd(shapes, seed=seed)
    lora = formats.from_state_dict(sd)
    lora.embeddings = {}
    return lora


def test_kohya_writer_metadata_and_layout(tmp_path, shapes):
    lora = _neutral(shapes)
    formats.save_lora(lora, tmp_path / "k.safetensors", metadata={"ss_output_name": "mine"})
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"  # ranks differ
    assert json.loads(meta["ss_network_args"])["conv_dim"] in ("Dynamic", "2", "3", "4")
    assert meta["ss_output_name"] == "mine"
    assert f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_out_0.lora_up.weight" in names
    assert "lora_te_text_model_encoder_layers_2_mlp_fc1.alpha" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" not in names  # alpha = rank: none written

    uniform = Lora(modules={"unet": {UNET_LINEAR[0]: Adapter("lora", {"down": torch.ones(4, 32),
                                                                      "up": torch.ones(32, 4)}, 2.0)},
                            "text_encoder": {}})
    formats.save_lora(uniform, tmp_path / "u.safetensors")
    with safe_open(str(tmp_path / "u.safetensors"), "pt") as f:
        assert (f.metadata()["ss_network_dim"], f.metadata()["ss_network_alpha"]) == ("4", "2.0")


@pytest.mark.parametrize("first", ["kohya", "diffusers"])
def test_round_trips_are_exact(tmp_path, shapes, first):
    lora = _neutral(shapes, seed=16)
    second = "diffusers" if first == "kohya" else "kohya"
    formats.save_lora(lora, tmp_path / "a.safetensors", format=first)
    formats.convert(tmp_path / "a.safetensors", tmp_path / "b.safetensors", to=second)
    formats.convert(tmp_path / "b.safetensors", tmp_path / "c.safetensors", to=first)
    for name in ("a", "b", "c"):
        back = formats.load_lora(tmp_path / f"{name}.safetensors")
        assert {(c, p) for c, p, _ in back.items()} == {(c, p) for c, p, _ in lora.items()}
        for comp, p, ad in lora.items():
            got = back.modules[comp][p]
            assert got.alpha == ad.alpha or (ad.alpha is None and got.alpha == ad.rank)  # absent alpha = rank
            assert torch.equal(got.delta(shapes[comp][p]), ad.delta(shapes[comp][p])), (name, p)
            assert torch.equal(got.tensors["down"], ad.tensors["down"])


def test_lycoris_saved_as_kohya_only(tmp_path, shapes):
    g = torch.Generator().manual_seed(17)
    o, i = shapes["unet"][UNET_LINEAR[0]]
    loha = Adapter("loha", {"w1a": torch.randn(o, 2, generator=g), "w1b": torch.randn(2, i, generator=g),
                            "w2a": torch.randn(o, 2, generator=g), "w2b": torch.randn(2, i, generator=g)}, 1.0)
    lokr = Adapter("lokr", {"w1": torch.randn(4, 4, generator=g), "w2a": torch.randn(o // 4, 2, generator=g),
                            "w2b": torch.randn(2, i // 4, generator=g)}, 3.0)
    lora = Lora(modules={"unet": {UNET_LINEAR[0]: loha, UNET_LINEAR[1]: lokr}, "text_encoder": {}})
    with pytest.raises(SdtuneError, match="format='kohya'"):
        formats.save_lora(lora, tmp_path / "x.safetensors", format="diffusers")
    assert not (tmp_path / "x.safetensors").exists()
    formats.save_lora(lora, tmp_path / "x.safetensors", format="kohya")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
        assert json.loads(f.metadata()["ss_network_args"])["algo"] == "loha+lokr"
    back = formats.load_lora(tmp_path / "x.safetensors")
    for p, ad in lora.modules["unet"].items():
        assert back.modules["unet"][p].kind == ad.kind
        assert torch.equal(back.modules["unet"][p].delta((o, i)), ad.delta((o, i)))


def test_diffusers_file_with_embeddings_refused(tmp_path):
    lora = Lora(embeddings={"<s1>": torch.ones(8)})
    lora.modules["unet"][UNET_LINEAR[0]] = Adapter("lora", {"down": torch.ones(1, 32), "up": torch.ones(32, 1)})
    with pytest.raises(SdtuneError, match="embeddings"):
        formats.save_lora(lora, tmp_path / "d.safetensors", format="diffusers")
    formats.save_lora(lora, tmp_path / "k.safetensors", format="kohya")
    assert torch.equal(formats.load_lora(tmp_path / "k.safetensors").embeddings["<s1>"], torch.ones(1, 8))


def test_diffusers_output_loads_in_diffusers_exactly(tmp_path, parts, shapes, diffusers_says):
    """The oracle: diffusers' own loader reads every key of sdtune's diffusers file, scale included."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    lora = _neutral(shapes, seed=18)
    # add a LoCon Tucker module: written folded into lora_A
    g = torch.Generator().manual_seed(19)
    o, i, kh, kw = shapes["unet"][UNET_CONV3[1]]
    lora.modules["unet"][UNET_CONV3[1]] = Adapter("lora", {"down": torch.randn(2, i, 1, 1, generator=g),
                                                           "mid": torch.randn(2, 2, kh, kw, generator=g),
                                                           "up": torch.randn(o, 2, 1, 1, generator=g)}, 0.5)
    formats.save_lora(lora, tmp_path / "d.safetensors", format="diffusers")
    unet, text = copy.deepcopy(parts["unet"]), copy.deepcopy(parts["text_encoder"])
    base = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in (("unet", unet), ("text_encoder", text))}
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=text, tokenizer=parts["tokenizer"], unet=unet,
                                   scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    text_out = diffusers_says(lambda: pipe.load_lora_weights(str(tmp_path / "d.safetensors"), adapter_name="x"))
    assert "UNEXPECTED" not in text_out and "did not match" not in text_out, text_out[-2000:]
    assert not re.search(r"lora_[AB].*MISSING", text_out), text_out[-2000:]
    # every module got its adapter with the file's factors, nothing else got one
    for comp, model in (("unet", unet), ("text_encoder", text)):
        wrapped = {n.removeprefix("text_model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
        assert wrapped == set(lora.modules[comp]), comp
    pipe.fuse_lora(adapter_names=["x"], lora_scale=1.0)
    for comp, model in (("unet", unet), ("text_encoder", text)):
        for p, ad in lora.modules[comp].items():
            mod = model.get_submodule(p)
            fused = (mod.base_layer if hasattr(mod, "base_layer") else mod).weight.detach()
            w0 = base[comp][f"{p}.weight"]
            want = w0 + ad.delta(w0.shape)
            rel = ((fused - want).norm() / (want - w0).norm()).item()
            assert rel < 1e-5, (comp, p, rel)


def test_inspect_describe_and_render(tmp_path, shapes):
    lora = _neutral(shapes, seed=20)
    lora.embeddings = {"tok": torch.zeros(2, 64)}
    formats.save_lora(lora, tmp_path / "k.safetensors", metadata={"ss_training_comment": "hi"})
    info = inspect.describe(tmp_path / "k.safetensors")
    json.dumps(info)  # --json works
    assert info["format"] == "kohya" and info["modules"] == {"unet": 12, "text_encoder": 3}
    assert info["ranks"] == [2, 3, 4] and info["alphas"] == [1.0, 2.5, 6.0, 16.0] and info["alpha_missing"] == 3
    assert info["conv_layers"] == 3 and info["conv1x1_layers"] == 2 and info["lycoris"] is None
    assert info["metadata"]["ss_training_comment"] == "hi" and info["embeddings"] == {"tok": [2, 64]}
    text = inspect.render(info)
    assert "ranks" in text and "2, 3, 4" in text and "ss_training_comment" in text and "tok (2, 64)" in text
    assert info["scales"] == sorted({round(ad.scale, 6) for _, _, ad in lora.items()})
    assert any(math.isclose(s, 16.0 / 3, rel_tol=1e-5) for s in info["scales"])
