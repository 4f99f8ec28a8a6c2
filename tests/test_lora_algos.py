"""The adapter algorithm registry: each algorithm's ΔW against an independent float64 computation, and a new
algorithm added by registering one class, read from a file and applied by ``LoraSet`` with no other change."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.cli import main
from sdtune.console import SdtuneWarning
from sdtune.lora import algos, formats, tools
from sdtune.lora.algos.base import Algorithm, Io
from sdtune.lora.neutral import Adapter
from sdtune.lora.patch import LoraSet
from sdtune.safeio import SdtuneError
from sdtune.tiny import model as tiny

UNET_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
D = torch.float64


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def kron64(a, b):
    """kron(a, b) written out: out[i·p + k, j·q + l] = a[i, j] · b[k, l]."""
    (m, n), (p, q) = a.shape, b.shape
    return torch.einsum("ij,kl->ikjl", a.to(D), b.to(D)).reshape(m * p, n * q)


def tucker64(t, wa, wb):
    """LyCORIS's Tucker rebuild: W[p, q, k, l] = Σ_ij t[i, j, k, l] wa[i, p] wb[j, q]."""
    return torch.einsum("ijkl,ip,jq->pqkl", t.to(D), wa.to(D), wb.to(D))


def adapter(kind, roles, alpha=None):
    """An adapter as a file's roles make it: through the algorithm's own ``build``."""
    return Adapter(kind, algos.get(kind).build(roles), alpha)


def test_registry_lists_the_algorithms_with_distinct_file_keys():
    assert list(algos.ALGORITHMS)[:4] == ["lora", "loha", "lokr", "diff"]
    roles = algos.kohya_roles()
    assert roles["lora_down.weight"] == ("lora", "down") and roles["hada_w1_a"] == ("loha", "w1a")
    assert roles["lokr_w2_b"] == ("lokr", "w2b") and roles["diff"] == ("diff", "diff")
    assert sum(len(a.roles) for a in algos.ALGORITHMS.values()) == len(roles)  # no suffix claimed twice

    class Clash(Algorithm):
        name, style, roles = "clash", "clash", {"hada_w1_a": "x"}

    with pytest.raises(ValueError, match="already belong"):
        algos.register(Clash())
    with pytest.raises(ValueError, match="unknown adapter kind"):
        algos.get("nope")


def test_lora_linear_conv_and_tucker():
    g = torch.Generator().manual_seed(0)
    down, up = rand(g, 4, 12), rand(g, 10, 4)
    ad = adapter("lora", {"down": down, "up": up}, alpha=2.0)
    assert ad.rank == 4 and ad.scale == 0.5 and ad.io() == Io(10, 12, None)
    torch.testing.assert_close(ad.delta((10, 12), D), 0.5 * up.to(D) @ down.to(D))

    down = rand(g, 3, 5, 3, 3)  # LoCon: the kernel is down's, up is 1x1
    up = rand(g, 6, 3, 1, 1)
    ad = adapter("lora", {"down": down, "up": up}, alpha=6.0)
    want = 2.0 * torch.einsum("or,rikl->oikl", up.flatten(1).to(D), down.to(D))
    assert ad.io() == Io(6, 45, (3, 3))
    torch.testing.assert_close(ad.delta((6, 5, 3, 3), D), want)

    down, mid, up = rand(g, 3, 5, 1, 1), rand(g, 3, 3, 3, 3), rand(g, 6, 3, 1, 1)  # Tucker LoCon core
    ad = adapter("lora", {"down": down, "mid": mid, "up": up}, alpha=3.0)
    want = torch.einsum("os,srkl,ri->oikl", up.flatten(1).to(D), mid.to(D), down.flatten(1).to(D))
    assert ad.rank == 3 and ad.io() == Io(6, 45, (3, 3)) and ad.algo.low_rank(ad.tensors) is None
    torch.testing.assert_close(ad.delta((6, 5, 3, 3), D), want)
    a, b = ad.algo.peft_factors(ad.tensors)  # PEFT's folded pair gives the same ΔW (folded in float32)
    torch.testing.assert_close((b.flatten(1).to(D) @ a.flatten(1).to(D)).reshape(6, 5, 3, 3), want,
                               rtol=1e-5, atol=1e-5)

    with pytest.raises(KeyError):
        algos.get("lora").build({"down": down})


def test_loha_plain_and_tucker():
    g = torch.Generator().manual_seed(1)
    w1a, w1b, w2a, w2b = rand(g, 10, 2), rand(g, 2, 12), rand(g, 10, 2), rand(g, 2, 12)
    ad = adapter("loha", {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b}, alpha=1.0)
    want = 0.5 * (w1a.to(D) @ w1b.to(D)) * (w2a.to(D) @ w2b.to(D))
    assert ad.rank == 2 and ad.io() == Io(10, 12, None)
    torch.testing.assert_close(ad.delta((10, 12), D), want)

    t1, t2 = rand(g, 2, 2, 3, 3), rand(g, 2, 2, 3, 3)
    wa1, wb1, wa2, wb2 = rand(g, 2, 6), rand(g, 2, 5), rand(g, 2, 6), rand(g, 2, 5)
    ad = adapter("loha", {"t1": t1, "w1a": wa1, "w1b": wb1, "t2": t2, "w2a": wa2, "w2b": wb2}, alpha=4.0)
    want = 2.0 * tucker64(t1, wa1, wb1) * tucker64(t2, wa2, wb2)
    assert ad.rank == 2  # folded without changing the rank, so the same alpha / rank
    torch.testing.assert_close(ad.delta((6, 5, 3, 3), D), want)


def test_lokr_whole_and_split_factors():
    g = torch.Generator().manual_seed(2)
    w1, w2a, w2b = rand(g, 2, 3), rand(g, 5, 2), rand(g, 2, 4)
    ad = adapter("lokr", {"w1": w1, "w2a": w2a, "w2b": w2b}, alpha=1.0)
    assert ad.rank == 2 and ad.scale == 0.5 and ad.io() == Io(10, 12, None)
    torch.testing.assert_close(ad.delta((10, 12), D), 0.5 * kron64(w1, w2a.to(D) @ w2b.to(D)))

    w1, w2 = rand(g, 2, 3), rand(g, 5, 4)
    ad = adapter("lokr", {"w1": w1, "w2": w2}, alpha=7.0)
    assert ad.rank is None and ad.scale == 1.0  # whole factors have no rank: alpha does not scale
    torch.testing.assert_close(ad.delta((10, 12), D), kron64(w1, w2))

    with pytest.raises(KeyError):
        algos.get("lokr").build({"w1": w1, "w1a": w1, "w1b": w1, "w2": w2})

    # a conv's split w2 as LyCORIS's functional API writes it, w2b [rank, in, kh, kw], with rank = kh (3): its
    # weight_gen rebuilds w2 = (w2a @ w2b.view(rank, -1)).view(-1, in, kh, kw); a batched matmul over the last two
    # dims ran too, with other numbers
    w1, w2a, w2b = rand(g, 8, 4), rand(g, 8, 3), rand(g, 3, 8, 3, 3)
    ad = adapter("lokr", {"w1": w1, "w2a": w2a, "w2b": w2b}, alpha=3.0)
    w2 = (w2a.to(D) @ w2b.to(D).reshape(3, -1)).reshape(8, 8, 3, 3)
    want = torch.einsum("ij,klmn->ikjlmn", w1.to(D), w2).reshape(64, 32, 3, 3)  # kron over out and in channels
    assert ad.io() == Io(64, 32 * 9, None)
    torch.testing.assert_close(ad.delta((64, 32, 3, 3), D).reshape(want.shape), want)


def test_diff_is_the_difference_itself():
    g = torch.Generator().manual_seed(3)
    d = rand(g, 6, 5, 3, 3)
    ad = adapter("diff", {"diff": d})
    assert ad.rank is None and ad.scale == 1.0 and ad.io() == Io(6, 45, (3, 3))
    torch.testing.assert_close(ad.delta((6, 5, 3, 3), D), d.to(D))


def test_apply_is_the_weight_plus_strength_times_delta():
    g = torch.Generator().manual_seed(4)
    w0 = rand(g, 10, 12).to(D)
    ad = adapter("loha", {"w1a": rand(g, 10, 2), "w1b": rand(g, 2, 12), "w2a": rand(g, 10, 2),
                          "w2b": rand(g, 2, 12)}, alpha=3.0)
    torch.testing.assert_close(ad.apply(w0, 0.7), w0 + 0.7 * ad.delta(w0.shape, D))


class RowCol(Algorithm):
    """A toy non-additive algorithm: W' = W ⊙ (1 + strength · outer(row, col))."""

    name, style, roles, additive = "rowcol", "toy-rowcol", {"toy_row": "row", "toy_col": "col"}, False

    def io(self, t):
        return Io(t["row"].numel(), t["col"].numel(), None)

    def apply(self, weight, t, scale, strength):
        return weight * (1 + strength * scale * torch.outer(t["row"], t["col"]))


@pytest.fixture
def rowcol():
    algos.register(RowCol())
    yield
    del algos.ALGORITHMS["rowcol"]


def test_a_registered_algorithm_is_read_from_a_file_and_patched(rowcol, tmp_path):
    parts = tiny.build(seed=0)
    layer = parts["unet"].get_submodule(UNET_ATTN)
    w0 = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    row, col = rand(g, w0.shape[0]), rand(g, w0.shape[1])
    name = "lora_unet_" + UNET_ATTN.replace(".", "_")
    path = tmp_path / "toy.safetensors"
    save_file({f"{name}.toy_row": row, f"{name}.toy_col": col}, path)

    lora = formats.load_lora(path, model_keys={"unet": parts["unet"]})
    ad = lora.modules["unet"][UNET_ATTN]
    assert lora.format == "toy-rowcol" and ad.kind == "rowcol" and not lora.unknown

    loras = LoraSet(parts["unet"], parts["text_encoder"])
    loras.add("toy", path, weight=0.5)
    torch.testing.assert_close(layer.weight.detach(), w0 * (1 + 0.5 * torch.outer(row, col)))
    loras.remove("toy")
    assert torch.equal(layer.weight.detach(), w0)  # restored bit for bit


def test_known_adapter_types_sdtune_does_not_apply_are_named(tmp_path):
    """A file of a type other tools write but sdtune does not apply is refused by that type's name, not as "no
    such layer" (which blamed the base model) or "is this a LoRA file?"; allowed partial, the rest applies."""
    parts = tiny.build(seed=0)
    s = LoraSet.attach(parts)
    g = torch.Generator().manual_seed(0)

    def k(path):
        return "lora_unet_" + path.replace(".", "_")
    conv = "down_blocks.1.resnets.0.conv1"
    w0 = parts["unet"].get_submodule(conv).weight.detach().clone()
    old_oft = {f"unet.{UNET_ATTN}.oft_r": rand(g, 4, 8, 8), f"unet.{UNET_ATTN}.oft_s": rand(g, 32, 1)}
    cases = {
        "old-oft": (old_oft, r"holds PEFT's older OFT \(oft_r/oft_s\), which sdtune does not apply; it reads LoRA, "
                             r"LoCon, LoHa, LoKr, DoRA \(on LoRA, LoHa and LoKr\), OFT, BOFT, GLoRA, IA3, LyCORIS full "
                             r"weight and bias differences"),
        # PEFT's own LoHa/LoKr/BOFT files (save_pretrained): LyCORIS's tensor names on PEFT's module paths
        "peft-loha": ({f"base_model.model.{UNET_ATTN}.hada_{w}": rand(g, 4, 32) for w in ("w1_a", "w2_a")} |
                      {f"base_model.model.{UNET_ATTN}.hada_{w}": rand(g, 4, 32) for w in ("w1_b", "w2_b")},
                      r"holds a PEFT LoHa \(hada_ tensors on PEFT's module paths\), which sdtune does not apply"),
        "peft-lokr": ({f"base_model.model.{UNET_ATTN}.lokr_w1": rand(g, 4, 4),
                       f"base_model.model.{UNET_ATTN}.lokr_w2": rand(g, 8, 8)}, r"holds a PEFT LoKr \("),
        "peft-boft": ({f"base_model.model.{UNET_ATTN}.boft_R": rand(g, 1, 4, 8, 8),
                       f"base_model.model.{UNET_ATTN}.boft_s": rand(g, 32, 1)}, r"holds PEFT's BOFT \(boft_R/boft_s\)"),
        "mixed": (old_oft | {k(conv) + ".diff": rand(g, 64, 32, 3, 3)},
                  r"2 of 3 LoRA entries do not fit this model: 2 that are PEFT's older OFT \(oft_r/oft_s\), which "
                  r"sdtune does not apply"
                  r" .*; allow partial loading \(--allow-partial\) to apply the rest without them$"),
    }
    for name, (sd, message) in cases.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(SdtuneError, match=message):
            s.add(name, tmp_path / f"{name}.safetensors")
        assert not len(s)
    with pytest.warns(UserWarning, match=r"that are PEFT's older OFT .*applying only the 1 that fit"):
        s.add("mixed", tmp_path / "mixed.safetensors", allow_partial=True)
    torch.testing.assert_close(parts["unet"].get_submodule(conv).weight, w0 + cases["mixed"][0][k(conv) + ".diff"])


def test_full_bias_and_norm_adapters_change_weights_and_biases_and_restore_exactly(tmp_path):
    """LyCORIS full's ``diff_b`` and norm-layer ``w_norm``/``b_norm``: W' = W0 + w·diff, b' = b0 + w·diff_b, a
    norm's scale and bias likewise, as A1111 (network_full, network_norm: ex_bias times the multiplier) and
    ComfyUI (a "diff" patch on the bias) apply them; beside a plain LoRA on the same layer; every original comes
    back bit for bit."""
    parts = tiny.build(seed=0)
    g = torch.Generator().manual_seed(5)

    def k(path, prefix="lora_unet_"):
        return prefix + path.replace(".", "_")
    conv, group, layer = ("down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.norm1",
                          "down_blocks.0.attentions.0.transformer_blocks.0.norm1")
    te_norm = "encoder.layers.0.layer_norm1"
    unet, te = parts["unet"], parts["text_encoder"]
    mods = {conv: unet.get_submodule(conv), group: unet.get_submodule(group), layer: unet.get_submodule(layer),
            te_norm: te.get_submodule(te_norm)}
    before = {p: (m.weight.detach().clone(), m.bias.detach().clone()) for p, m in mods.items()}
    sd = {k(conv) + ".diff": rand(g, 64, 32, 3, 3), k(conv) + ".diff_b": rand(g, 64),
          k(group) + ".w_norm": rand(g, 32), k(group) + ".b_norm": rand(g, 32),
          k(layer) + ".w_norm": rand(g, 32), k(layer) + ".b_norm": rand(g, 32),
          k("text_model." + te_norm, "lora_te_") + ".w_norm": rand(g, 64),
          k("text_model." + te_norm, "lora_te_") + ".b_norm": rand(g, 64)}
    save_file(sd, tmp_path / "full.safetensors")
    lora = formats.load_lora(tmp_path / "full.safetensors")
    assert {ad.kind for _, _, ad in lora.items()} == {"diff", "norm"} and not lora.unknown
    plain = {k(conv) + ".lora_down.weight": rand(g, 2, 32, 3, 3), k(conv) + ".lora_up.weight": rand(g, 64, 2, 1, 1),
             k(conv) + ".alpha": torch.tensor(1.0)}
    save_file(plain, tmp_path / "plain.safetensors")
    s = LoraSet.attach(parts)
    s.add("plain", tmp_path / "plain.safetensors", 0.5)
    s.add("full", tmp_path / "full.safetensors", 0.7)

    def want(path, w, suffix):
        name = k(path) if path != te_norm else k("text_model." + te_norm, "lora_te_")
        w0, b0 = before[path]
        return w0 + w * sd[name + suffix[0]], b0 + w * sd[name + suffix[1]]
    up, down = plain[k(conv) + ".lora_up.weight"].flatten(1), plain[k(conv) + ".lora_down.weight"].flatten(1)
    for w in (0.7, -0.3):
        wc, bc = want(conv, w, (".diff", ".diff_b"))
        torch.testing.assert_close(mods[conv].weight, wc + 0.5 * 0.5 * (up @ down).reshape(wc.shape))
        torch.testing.assert_close(mods[conv].bias, bc)
        for p in (group, layer, te_norm):
            wn, bn = want(p, w, (".w_norm", ".b_norm"))
            torch.testing.assert_close(mods[p].weight, wn)
            torch.testing.assert_close(mods[p].bias, bn)
        s.set_weights({"full": -0.3})
    s.remove("full")  # the LoRA stays on the conv; its bias is the original again
    assert torch.equal(mods[conv].bias, before[conv][1]) and not torch.equal(mods[conv].weight, before[conv][0])
    s.remove_all()
    for p, (w0, b0) in before.items():
        assert torch.equal(mods[p].weight, w0) and torch.equal(mods[p].bias, b0)
    assert s.pristine_bytes() == 0
    # a bias change on a layer with no bias (attn1.to_q) is refused before anything is patched
    save_file({k(UNET_ATTN) + ".diff": rand(g, 32, 32), k(UNET_ATTN) + ".diff_b": rand(g, 32)},
              tmp_path / "nobias.safetensors")
    with pytest.raises(SdtuneError, match=r"nobias.safetensors: changes the bias of unet:down_blocks.0.attentions.0."
                                          r"transformer_blocks.0.attn1.to_q, which has none in this model"):
        s.add("nobias", tmp_path / "nobias.safetensors")
    assert not len(s)


def test_full_bias_and_norm_adapters_round_trip_and_are_kept_out_of_lora_tools(tmp_path):
    g = torch.Generator().manual_seed(6)
    conv, norm = "lora_unet_down_blocks_1_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_norm1"
    sd = {conv + ".diff": rand(g, 64, 32, 3, 3), conv + ".diff_b": rand(g, 64), norm + ".w_norm": rand(g, 32),
          norm + ".b_norm": rand(g, 32)}
    save_file(sd, tmp_path / "full.safetensors")
    formats.convert(tmp_path / "full.safetensors", tmp_path / "again.safetensors")
    again = load_file(tmp_path / "again.safetensors")
    assert set(again) == set(sd) and all(torch.equal(again[key], sd[key]) for key in sd)
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "full", "conv_dim": "Dynamic", "conv_alpha": "Dynamic",
                                                   "train_norm": "True"}
    with pytest.raises(SdtuneError, match=r"full \(diff\)/norm \(w_norm/b_norm\) adapters have no layout that "
                                          r"diffusers loads"):
        formats.convert(tmp_path / "full.safetensors", tmp_path / "d.safetensors", to="diffusers")
    for call in (lambda: tools.merge_loras([(tmp_path / "full.safetensors", 1.0)], tmp_path / "m.safetensors"),
                 lambda: tools.resize_lora(tmp_path / "full.safetensors", tmp_path / "r.safetensors", rank=4)):
        with pytest.raises(SdtuneError, match=r"full.safetensors: changes the biases or norm layers of 2 layers .*"
                                              r"which LoRA factors cannot hold.*Add --drop-biases to leave them out"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "full.safetensors"]


def test_drop_biases_makes_a_full_file_a_lora_of_its_weight_changes(tmp_path):
    """--drop-biases (lora resize, lora merge): a LyCORIS full file's weight changes as LoRA factors (exact at their
    own rank), its bias and norm-layer changes left out and said so once, instead of the file refused."""
    g = torch.Generator().manual_seed(8)
    conv, norm = "lora_unet_down_blocks_1_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_norm1"
    low_rank = (rand(g, 64, 3) @ rand(g, 3, 32 * 9)).reshape(64, 32, 3, 3)  # a change of rank 3
    save_file({conv + ".diff": low_rank, conv + ".diff_b": rand(g, 64), norm + ".w_norm": rand(g, 32),
               norm + ".b_norm": rand(g, 32)}, tmp_path / "full.safetensors")
    with pytest.warns(SdtuneWarning, match=r"full.safetensors: the changes to the biases and norm layers of 2 "
                                           r"layers are left out \(--drop-biases\)$") as said:
        assert main(["lora", "resize", str(tmp_path / "full.safetensors"), "--rank", "3", "--out",
                     str(tmp_path / "r.safetensors"), "--drop-biases"]) == 0
    assert len(said) == 1
    lora = formats.load_lora(tmp_path / "r.safetensors")
    (comp, path, ad), = lora.items()
    assert (comp, path, ad.kind, ad.rank) == ("unet", "down_blocks.1.resnets.0.conv1", "lora", 3)
    assert ad.bias_part() is None and torch.allclose(ad.delta(low_rank.shape), low_rank, atol=1e-4)
    with pytest.warns(SdtuneWarning, match="left out"):
        assert main(["lora", "merge", f"{tmp_path / 'full.safetensors'}:0.5", "--out",
                     str(tmp_path / "m.safetensors"), "--drop-biases"]) == 0
    (_, _, merged), = formats.load_lora(tmp_path / "m.safetensors").items()
    assert torch.allclose(merged.delta(low_rank.shape), 0.5 * low_rank, atol=1e-4)
