"""The LoRA toolbox (``sdtune lora merge|resize|extract``): the weights each output patches in, its ranks, its
layout, against computations done here (LoraSet with the inputs, SVDs in float64, sd-scripts' rank rules)."""

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.cli import main
from sdtune.console import SdtuneWarning
from sdtune.lora import ranks, tools
from sdtune.lora.formats import load_lora, save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.models import load_base, save_diffusers, save_single_file

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
CONV = "down_blocks.1.resnets.0.conv1"
TE_Q = "encoder.layers.1.self_attn.q_proj"
# diffusers tells kohya text-encoder keys apart by an out_proj among them, as every real kohya file has one
TE_OUT = "encoder.layers.1.self_attn.out_proj"


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-random", device="cpu", dtype="fp32")


def _shape(base, comp, path):
    return getattr(base, comp).get_submodule(path).weight.shape


def lora_file(base, path, seed, rank, alpha, conv=False, te=True, loha_on=None) -> str:
    g = torch.Generator().manual_seed(seed)
    lora = Lora()
    layers = [("unet", ATTN), ("unet", FF)] + ([("text_encoder", TE_Q), ("text_encoder", TE_OUT)] if te else [])
    for comp, p in layers:
        out_f, in_f = _shape(base, comp, p)
        if p == loha_on:
            lora.modules[comp][p] = Adapter("loha", {k: torch.randn(*s, generator=g) * 0.3 for k, s in
                                                     (("w1a", (out_f, 2)), ("w1b", (2, in_f)), ("w2a", (out_f, 2)),
                                                      ("w2b", (2, in_f)))}, alpha=1.0)
            continue
        lora.modules[comp][p] = Adapter("lora", {"down": torch.randn(rank, in_f, generator=g) * 0.3,
                                                 "up": torch.randn(out_f, rank, generator=g) * 0.3}, alpha)
    if conv:
        o, i, kh, kw = _shape(base, "unet", CONV)
        lora.modules["unet"][CONV] = Adapter("lora", {"down": torch.randn(rank, i, kh, kw, generator=g) * 0.1,
                                                      "up": torch.randn(o, rank, 1, 1, generator=g) * 0.1}, alpha)
    save_lora(lora, path)
    return str(path)


def patched(base, loras: list[tuple[str, float]]) -> dict:
    """The weights LoraSet makes from these (file, weight) pairs, then the base restored."""
    for i, (p, w) in enumerate(loras):
        base.loras.add(f"l{i}", p, w)
    out = {(c, p): getattr(base, c).get_submodule(p).weight.detach().clone()
           for c, p in (("unet", ATTN), ("unet", FF), ("unet", CONV), ("text_encoder", TE_Q),
                                   ("text_encoder", TE_OUT))}
    base.loras.remove_all()
    return out


def deltas(lora: Lora) -> dict:
    return {(c, p): ad.delta(ad.io()[:2]).double() for c, p, ad in lora.items()}


# ---------------------------------------------------------------- merge

def test_exact_merge_patches_as_both_loaded(base, tmp_path):
    a = lora_file(base, tmp_path / "a.safetensors", 0, rank=2, alpha=1.0, conv=True)
    b = lora_file(base, tmp_path / "b.safetensors", 1, rank=3, alpha=6.0)
    out = tmp_path / "mix.safetensors"
    assert main(["lora", "merge", f"{a}:0.5", f"{b}:1.0", "--out", str(out)]) == 0
    mix = load_lora(out)
    assert mix.modules["unet"][ATTN].rank == 5 and mix.modules["unet"][ATTN].alpha == 5.0  # ranks add, scale 1
    assert mix.modules["unet"][CONV].rank == 2 and mix.modules["unet"][CONV].tensors["down"].dim() == 4
    want, got = patched(base, [(a, 0.5), (b, 1.0)]), patched(base, [(str(out), 1.0)])
    for k in want:
        # the same sum in another order: fp32 rounding of values of size ~1 (1e-5 is ~100 ulp)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    assert not torch.equal(want[("unet", ATTN)], base.unet.get_submodule(ATTN).weight)


def test_merge_keeps_what_all_its_inputs_say_of_their_base_model(base, tmp_path):
    """A mix of two LoRAs made on one model (a Pony fine-tune, say) still names it; what they disagree on goes."""
    facts = {"ss_sd_model_name": "ponyDiffusionV6XL.safetensors", "modelspec.architecture": "sd-v1/lora"}
    for name, seed, clip_skip in (("a", 0, "2"), ("b", 1, "None")):
        path = lora_file(base, tmp_path / f"{name}.safetensors", seed, rank=2, alpha=1.0)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        save_file(load_file(str(path)), str(path), metadata={**meta, **facts, "ss_clip_skip": clip_skip})
    out = tmp_path / "mix.safetensors"
    assert main(["lora", "merge", f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}",
                 "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert facts.items() <= meta.items() and "ss_clip_skip" not in meta
    assert meta["ss_training_comment"] == "sdtune lora merge: a.safetensors:0.5 + b.safetensors:1"


def test_merge_takes_the_text_encoders_own_weight_as_loading_does(base, tmp_path):
    a = lora_file(base, tmp_path / "a.safetensors", 0, rank=2, alpha=1.0)
    b = lora_file(base, tmp_path / "b.safetensors", 1, rank=3, alpha=6.0)
    out = tmp_path / "mix.safetensors"
    # A1111's forms: named (each overrides a plain weight), or the text encoders' then the UNet's
    assert main(["lora", "merge", f"{a}:unet=0.5:te=0.2", f"{b}:2:unet=-1:te=0.25", "--out", str(out)]) == 0
    want, got = patched(base, [(a, (0.5, 0.2)), (b, (-1.0, 0.25))]), patched(base, [(str(out), 1.0)])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    assert not torch.equal(want[("text_encoder", TE_Q)], patched(base, [(a, 0.5), (b, -1.0)])[("text_encoder", TE_Q)])
    assert load_lora(out).metadata["ss_training_comment"] == ("sdtune lora merge: a.safetensors:unet=0.5:te=0.2 + "
                                                              "b.safetensors:unet=-1:te=0.25")
    assert main(["lora", "merge", f"{a}:0.2:0.5", "--out", str(out)]) == 0  # positional: the same weights
    got = patched(base, [(str(out), 1.0)])
    torch.testing.assert_close(got[("text_encoder", TE_Q)], patched(base, [(a, (0.5, 0.2))])[("text_encoder", TE_Q)],
                               rtol=0, atol=1e-5)


def test_merge_takes_sdxl_second_encoders_own_weight(tmp_path):
    """FILE:W:te2=W2 weighs SDXL's second text encoder's layers alone, as the prompt tag's te2= does."""
    g = torch.Generator().manual_seed(0)
    lora = Lora()
    for comp, path, out_f, in_f in (("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 640, 2048),
                                    ("text_encoder", TE_Q, 768, 768), ("text_encoder_2", TE_Q, 1280, 1280)):
        lora.modules[comp][path] = Adapter("lora", {"down": torch.randn(2, in_f, generator=g),
                                                    "up": torch.randn(out_f, 2, generator=g)}, 2.0)
    save_lora(lora, tmp_path / "xl.safetensors")
    out = tmp_path / "mix.safetensors"
    assert main(["lora", "merge", f"{tmp_path / 'xl.safetensors'}:0.5:te2=0.25", f"{tmp_path / 'xl.safetensors'}:1",
                 "--out", str(out)]) == 0
    mix = load_lora(out)
    want = {"unet": 1.5, "text_encoder": 1.5, "text_encoder_2": 1.25}
    for comp, path, ad in mix.items():
        torch.testing.assert_close(ad.delta(ad.io()[:2]), want[comp] * lora.modules[comp][path].delta(ad.io()[:2]),
                                   rtol=1e-5, atol=1e-5)
    assert mix.metadata["ss_training_comment"] == "sdtune lora merge: xl.safetensors:0.5:te2=0.25 + xl.safetensors:1"


def test_merge_through_delta_for_loha_and_to_a_rank(base, tmp_path, capsys):
    a = lora_file(base, tmp_path / "a.safetensors", 0, rank=4, alpha=2.0, loha_on=FF, conv=True)
    b = lora_file(base, tmp_path / "b.safetensors", 1, rank=4, alpha=4.0)
    exact, reports = tools.merge_loras([(a, 0.7), (b, -0.4)], tmp_path / "x.safetensors")
    assert [r.path for r in reports] == [FF]  # only the LoHa layer goes through its ΔW
    want, got = patched(base, [(a, 0.7), (b, -0.4)]), patched(base, [(str(tmp_path / "x.safetensors"), 1.0)])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-5)
    # --rank 3: each layer is the float64 SVD truncation of the summed ΔW (plain LoRAs' from their factors)
    summed = {k: 0.7 * d for k, d in deltas(load_lora(a)).items()}
    for k, d in deltas(load_lora(b)).items():
        summed[k] = summed[k] - 0.4 * d
    low, reports = tools.merge_loras([(a, 0.7), (b, -0.4)], tmp_path / "r.safetensors", rank=3, to="diffusers")
    reread = load_lora(tmp_path / "r.safetensors")
    assert "peft" in reread.format or "diffusers" in reread.format
    for k, d in deltas(reread).items():
        u, s, vh = torch.linalg.svd(summed[k], full_matrices=False)
        torch.testing.assert_close(d, (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-5)
        assert reread.modules[k[0]][k[1]].rank == 3
        rep = next(r for r in reports if (r.component, r.path) == k)
        assert rep.fro == pytest.approx(float(s[:3].norm() / s.norm()), abs=1e-6)
    # the command line's --json: that table, as resize and extract print theirs
    capsys.readouterr()
    assert main(["lora", "merge", f"{a}:0.7", f"{b}:-0.4", "--rank", "3", "--out", str(tmp_path / "j.safetensors"),
                 "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [(r["component"], r["path"], r["fro"]) for r in table] == [(r.component, r.path, r.fro) for r in reports]


def test_a_layer_one_lycoris_adapter_alone_changes_stays_that_adapter_with_its_weight_folded_in(base, tmp_path):
    """A LoHa (or LoKr, full) layer no other input touches is written as that adapter, its weight in its first
    factor: exact and as small as it was (a LoKr turned into full-rank LoRA factors grew 648 KB -> 555 MB). Where
    the output cannot hold it (--to diffusers) or --rank asks for LoRA, it goes through its SVD, said in a note."""
    a = lora_file(base, tmp_path / "a.safetensors", 0, rank=4, alpha=2.0, loha_on=FF, conv=True)
    mix, reports = tools.merge_loras([(a, 0.7)], tmp_path / "x.safetensors")
    assert reports == [] and mix.modules["unet"][FF].kind == "loha"
    source = load_lora(a).modules["unet"][FF]
    torch.testing.assert_close(mix.modules["unet"][FF].delta(source.io()[:2]) * mix.modules["unet"][FF].scale,
                               0.7 * source.delta(source.io()[:2]) * source.scale, rtol=1e-6, atol=1e-7)
    want, got = patched(base, [(a, 0.7)]), patched(base, [(str(tmp_path / "x.safetensors"), 1.0)])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-5)
    assert {r: t.shape for r, t in load_lora(tmp_path / "x.safetensors").modules["unet"][FF].tensors.items()} == {
        r: t.shape for r, t in source.tensors.items()}  # its own factors, no larger
    with pytest.warns(SdtuneWarning, match=r"LoHa/LoKr/full adapter is made LoRA factors \(--to diffusers\): 1; "
                                           r"each is merged through the SVD"):
        _, reports = tools.merge_loras([(a, 0.7)], tmp_path / "d.safetensors", to="diffusers")
    assert [r.path for r in reports] == [FF]


def test_kohya_merge_loads_in_diffusers_with_no_unmatched_keys(base, tmp_path, caplog):
    a = lora_file(base, tmp_path / "a.safetensors", 0, rank=2, alpha=1.0, conv=True)
    b = lora_file(base, tmp_path / "b.safetensors", 1, rank=3, alpha=3.0)
    out = tmp_path / "mix.safetensors"
    tools.merge_loras([(a, 1.0), (b, 0.5)], out)
    pipe = load_base("tiny-random", device="cpu", dtype="fp32").pipeline()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out), adapter_name="mix")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or
                "not" in r.getMessage().lower() and "lora" in r.getMessage().lower()]
    wrapped = {n.removesuffix(".lora_A.mix") for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A.mix")}
    assert wrapped == {ATTN, FF, CONV}
    te = {n.removesuffix(".lora_A.mix") for n, _ in pipe.text_encoder.named_modules() if n.endswith(".lora_A.mix")}
    assert {n.removeprefix("text_model.") for n in te} == {TE_Q, TE_OUT}
    # and the same weights: its layers have ranks 5 and 2, and diffusers reads one alpha for a file (its per-layer
    # alphas go by names it builds wrongly), so the file has one alpha and each layer's scale is in its up factor
    assert len({float(ad.alpha) for _, _, ad in load_lora(out).items()}) == 1
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["mix"])
    for (comp, p), want in patched(base, [(str(out), 1.0)]).items():
        got = getattr(pipe, comp).get_submodule(p).weight
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{comp}.{p}")


def test_an_sdxl_merge_of_mixed_ranks_has_one_alpha_that_diffusers_applies(tmp_path):
    """diffusers reads a kohya SDXL file's per-layer alphas by names it builds wrongly for transformers 5's text
    encoders (peft: "alpha_pattern keys did not match any targeted module"), so such layers got the file's
    commonest alpha: a merge writes one alpha, each layer's scale in its up factor."""
    base = load_base("tiny-xl", device="cpu", dtype="fp32")
    q = next(n for n, _ in base.unet.named_modules() if n.endswith("attn1.to_q"))
    g = torch.Generator().manual_seed(0)

    def module(model, comp, p):  # transformers 5 keeps text_model in CLIPTextModelWithProjection only
        root = getattr(model, comp)
        return root.get_submodule(p if comp == "unet" or not hasattr(root, "text_model") else "text_model." + p)

    def write(path, layers, r):
        lora = Lora()
        for comp, p in layers:
            m = module(base, comp, p)
            lora.modules[comp][p] = Adapter("lora", {"down": torch.randn(r, m.in_features, generator=g) * 0.3,
                                                     "up": torch.randn(m.out_features, r, generator=g) * 0.3}, float(r))
        save_lora(lora, path)
        return str(path)

    te = [(c, p) for c in ("text_encoder", "text_encoder_2") for p in (TE_Q.replace("1", "0"), TE_OUT)]
    a = write(tmp_path / "a.safetensors", [("unet", q)] + te, 2)
    b = write(tmp_path / "b.safetensors", [("unet", q), ("text_encoder_2", TE_Q)], 3)
    out = tmp_path / "mix.safetensors"
    tools.merge_loras([(a, 1.0), (b, 1.0)], out)  # ranks 5 (to_q), 2 and 3 (text encoders)
    mix = load_lora(out)
    assert {ad.rank for _, _, ad in mix.items()} == {2, 3, 5} and {ad.alpha for _, _, ad in mix.items()} == {2.0}
    base.loras.add("mix", out, 1.0)
    pipe = load_base("tiny-xl", device="cpu", dtype="fp32").pipeline()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(out), adapter_name="mix")
    assert not [w for w in seen if "alpha_pattern" in str(w.message)]
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0, adapter_names=["mix"])
    for comp, p, _ in mix.items():
        torch.testing.assert_close(module(pipe, comp, p).weight, module(base, comp, p).weight, rtol=0, atol=1e-5,
                                   msg=f"{comp}.{p}")


def test_merge_errors_name_the_file(tmp_path, capsys):
    assert main(["lora", "merge", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and err.count("\n") == 1



def test_an_existing_file_that_holds_no_lora_is_not_written_over(base, tmp_path, capsys):
    """merge, resize and convert write over an earlier LoRA (a rerun), never over a model or another file."""
    from safetensors.torch import save_file

    lora = lora_file(base, tmp_path / "a.safetensors", 0, rank=2, alpha=1.0)
    model = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.ones(4, 4)}, str(model))
    kept = model.read_bytes()
    for args in (["lora", "merge", lora], ["lora", "resize", lora, "--rank", "1"], ["convert", "--to", "kohya", lora]):
        out_args = ["--out", str(model)] if args[0] == "lora" else [str(model)]
        assert main([*args, *out_args]) == 2
        assert f"{model}: exists and holds no LoRA" in capsys.readouterr().err
        assert model.read_bytes() == kept
    again = tmp_path / "again.safetensors"
    assert main(["lora", "merge", lora, "--out", str(again)]) == 0
    assert main(["lora", "merge", f"{lora}:0.5", "--out", str(again)]) == 0  # a rerun replaces its own output


# ---------------------------------------------------------------- resize

def sd_scripts_rank(s: np.ndarray, mode: str, param: float, cap: int) -> int:
    """resize_lora.py's rules written out again with numpy: an index in [0, n-1], rank = index + 1, capped."""
    n = len(s)
    if mode == "sv_ratio":
        index = int(np.sum(s > s[0] / param)) - 1
    elif mode == "sv_cumulative":
        index = int(np.searchsorted(np.cumsum(s) / s.sum(), param))
    else:
        sq = s ** 2
        index = int(np.searchsorted(np.cumsum(sq) / sq.sum(), param ** 2))
    return min(max(0, min(index, n - 1)) + 1, cap)


def test_dynamic_rank_edges():
    """The counting rules at their edges: one kept value when only s0 passes, a share met exactly keeps the
    values up to it, and the rank never passes n."""
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    assert ranks.dynamic_rank(s, "sv_ratio", 2.0) == 1  # 2.0 is not > 4 / 2
    assert ranks.dynamic_rank(s, "sv_ratio", 2.5) == 2
    assert ranks.dynamic_rank(s, "sv_ratio", 100.0) == 4
    assert ranks.dynamic_rank(s, "sv_cumulative", 0.5) == 1  # 4 / 8 reaches one half exactly
    assert ranks.dynamic_rank(s, "sv_cumulative", 0.76) == 3
    assert ranks.dynamic_rank(s, "sv_fro", 0.8) == 1  # 16 / 22 = 0.727 >= 0.64
    assert ranks.dynamic_rank(s, "sv_fro", 0.9) == 2  # 20 / 22 = 0.909 >= 0.81
    assert ranks.dynamic_rank(s, "sv_fro", 1.5) == 4


@pytest.mark.parametrize("mode, param", [("sv_ratio", 4.0), ("sv_cumulative", 0.6), ("sv_fro", 0.9)])
def test_dynamic_resize_ranks_follow_sd_scripts(base, tmp_path, capsys, mode, param):
    src = lora_file(base, tmp_path / "big.safetensors", 3, rank=16, alpha=8.0, conv=True)
    out = tmp_path / "small.safetensors"
    assert main(["lora", "resize", src, "--dynamic", mode, "--param", str(param), "--out", str(out), "--json"]) == 0
    rows = {(r["component"], r["path"]): r for r in json.loads(capsys.readouterr().out)}
    small = load_lora(out)
    assert small.metadata["ss_training_comment"] == f"Dynamic resize with {mode}: {param:g} from 16"
    for (comp, p), d in deltas(load_lora(src)).items():
        s = np.linalg.svd(d.numpy(), compute_uv=False)
        want = sd_scripts_rank(s, mode, param, cap=16)
        assert rows[(comp, p)]["rank"] == want == small.modules[comp][p].rank
        assert rows[(comp, p)]["fro"] == pytest.approx(np.sqrt((s[:want] ** 2).sum() / (s ** 2).sum()), abs=1e-6)
    assert len({r["rank"] for r in rows.values()}) > 1 or mode == "sv_ratio"


def test_fixed_resize_is_the_svd_truncation_with_a_table(base, tmp_path, capsys):
    src = lora_file(base, tmp_path / "big.safetensors", 4, rank=8, alpha=4.0, conv=True)
    out = tmp_path / "r4.safetensors"
    assert main(["lora", "resize", src, "--rank", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"unet.{ATTN}" in text and "8->4" in text and "fro kept" in text
    small = deltas(load_lora(out))
    for k, d in deltas(load_lora(src)).items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        torch.testing.assert_close(small[k], (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-5)
    assert load_lora(out).modules["unet"][CONV].tensors["down"].shape[2:] == (3, 3)
    assert load_lora(out).metadata["ss_training_comment"] == "dimension is resized from 8 to 4"  # as sd-scripts


def test_resize_takes_a_rank_of_its_own_for_3x3_convolutions(base, tmp_path, capsys):
    """--conv-rank (sd-scripts' new_conv_rank): LoCon's 3x3 layers get it, the others --rank."""
    src = lora_file(base, tmp_path / "big.safetensors", 4, rank=8, alpha=4.0, conv=True)
    out = tmp_path / "r.safetensors"
    assert main(["lora", "resize", src, "--rank", "4", "--conv-rank", "2", "--out", str(out)]) == 0
    small, big = load_lora(out), deltas(load_lora(src))
    assert small.modules["unet"][CONV].rank == 2 and small.modules["unet"][ATTN].rank == 4
    u, s, vh = torch.linalg.svd(big[("unet", CONV)], full_matrices=False)
    torch.testing.assert_close(deltas(small)[("unet", CONV)], (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)
    assert main(["lora", "resize", src, "--rank", "4", "--conv-rank", "0", "--out", str(out)]) == 2
    assert "--conv-rank 0: the rank must be 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("scale_sign", [1.0, -1.0])
def test_lokr_resize_takes_the_svd_from_the_kronecker_factors(tmp_path, scale_sign):
    """LoKr's ΔW = kron(w1, w2): its SVD comes from the factors' (milliseconds, where the dense float64 SVD of a
    real SD 1.5 LoKr took over 11 minutes), and equals the dense one: the same values, the same truncation."""
    g = torch.Generator().manual_seed(5)
    lora = Lora()
    lora.modules["unet"] = {
        "linear": Adapter("lokr", {"w1": torch.randn(4, 4, generator=g), "w2a": torch.randn(40, 3, generator=g),
                                   "w2b": torch.randn(3, 36, generator=g)}, alpha=3.0 * scale_sign),
        "conv": Adapter("lokr", {"w1": torch.randn(2, 4, generator=g),
                                 "w2": torch.randn(8, 5, 3, 3, generator=g)}, alpha=None)}
    src, out = tmp_path / "lokr.safetensors", tmp_path / "r5.safetensors"
    save_lora(lora, src)
    small, reports = tools.resize_lora(src, out, rank=5)
    for p, ad in load_lora(src).modules["unet"].items():
        dense = ad.delta(ad.io()[:2]).double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        got = small.modules["unet"][p].delta(small.modules["unet"][p].io()[:2]).double()
        torch.testing.assert_close(got, (u[:, :5] * s[:5]) @ vh[:5], rtol=0, atol=1e-4 * float(s[0]))
        report = next(r for r in reports if r.path == p)
        assert report.rank == 5 and report.fro == pytest.approx(float((s[:5].square().sum() / s.square().sum()).sqrt()))
    assert small.modules["unet"]["conv"].tensors["down"].shape[2:] == (3, 3)
    # merging one LoKr takes the same route (a weight of -0.5 included): exact, every singular value kept
    mix, _ = tools.merge_loras([(str(src), -0.5)], tmp_path / "m.safetensors")
    for p, ad in load_lora(src).modules["unet"].items():
        want = -0.5 * ad.delta(ad.io()[:2]).double()
        got = mix.modules["unet"][p].delta(mix.modules["unet"][p].io()[:2]).double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_a_resized_lycoris_file_says_it_is_a_plain_lora(tmp_path):
    g = torch.Generator().manual_seed(6)
    lora = Lora()
    lora.modules["unet"]["linear"] = Adapter("lokr", {"w1": torch.randn(4, 4, generator=g),
                                                      "w2": torch.randn(10, 9, generator=g)}, alpha=None)
    src, out = tmp_path / "lokr.safetensors", tmp_path / "r2.safetensors"
    save_lora(lora, src)
    assert json.loads(load_lora(src).metadata["ss_network_args"]) == {"algo": "lokr"}
    tools.resize_lora(src, out, rank=2)
    meta = load_lora(out).metadata  # the LoKr's layout entries were carried over
    assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta
    assert meta["ss_network_dim"] == "2"


def test_resize_needs_a_rank_or_a_mode(base, tmp_path, capsys):
    src = lora_file(base, tmp_path / "a.safetensors", 0, rank=2, alpha=1.0)
    assert main(["lora", "resize", src, "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "a.safetensors" in err and "--rank" in err and err.count("\n") == 1
    assert main(["lora", "resize", src, "--dynamic", "sv_fro", "--param", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--param 1.5: sv_fro keeps a share of the layer, from 0 to 1" in capsys.readouterr().err


# ---------------------------------------------------------------- extract

@pytest.mark.parametrize("shape", [(40, 360), (360, 40), (30, 30)])
def test_svd_of_wide_square_and_tall_deltas(shape):
    """Wide ΔWs go through a QR first (3x faster over SD 1.5's layers): the same singular values as LAPACK's SVD of
    the matrix, orthonormal factors, ΔW rebuilt."""
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    a[:, :3] *= 50  # a spread of singular values
    u, s, vh = tools._svd(a)
    a = a.double()
    k = min(shape)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close((u * s) @ vh, a, rtol=0, atol=1e-10)


def test_full_rank_extract_reproduces_the_tuned_model(tmp_path, capsys):
    src = load_base("tiny-random", device="cpu", dtype="fp32")
    src.scheduler.register_to_config(prediction_type="v_prediction")  # the LoRA records it, as kohya's extract
    save_single_file(src, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for comp, p in (("unet", ATTN), ("unet", FF), ("unet", CONV), ("text_encoder", TE_Q)):
            w = getattr(src, comp).get_submodule(p).weight
            w.add_(torch.randn(w.shape, generator=g) * 0.05)
    save_single_file(src, tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", "--base", str(tmp_path / "base.safetensors"), "--tuned",
                 str(tmp_path / "tuned.safetensors"), "--rank", "100000", "--text-encoder", "--min-diff", "1e-7",
                 "--out", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["component"], r["path"]) for r in rows} == {("unet", ATTN), ("unet", FF), ("unet", CONV),
                                                            ("text_encoder", TE_Q)}
    meta = load_lora(out).metadata
    assert meta["ss_v_parameterization"] == "True"
    # ModelSpec, as sd-scripts' extract writes it: the file's name, the base model's architecture and size
    assert {k: meta[k] for k in ("modelspec.architecture", "modelspec.title", "modelspec.resolution",
                                 "modelspec.prediction_type")} == \
        {"modelspec.architecture": f"{src.family.modelspec}/lora", "modelspec.title": "x",
         "modelspec.resolution": "64x64", "modelspec.prediction_type": "v"}
    assert all(r["fro"] == pytest.approx(1.0) for r in rows)
    again = load_base(str(tmp_path / "base.safetensors"), device="cpu", dtype="fp32")
    again.loras.add("x", out, 1.0)
    for comp, p in (("unet", ATTN), ("unet", FF), ("unet", CONV), ("text_encoder", TE_Q)):
        torch.testing.assert_close(getattr(again, comp).get_submodule(p).weight,
                                   getattr(src, comp).get_submodule(p).weight, rtol=0, atol=1e-6)
    # a low rank keeps less than all of it, and says so
    _, reports = tools.extract_lora(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                                    tmp_path / "r2.safetensors", rank=2, min_diff=1e-7)
    assert all(r.rank == 2 and r.fro < 0.9 for r in reports)


def test_extract_reads_single_files_layer_by_layer_with_the_loaded_models_result(tmp_path, monkeypatch):
    """Two .safetensors checkpoints are compared layer by layer from the files (no model is loaded, so two SD 1.5
    files no longer take 12.9 GB); the LoRA has the bits of the route that loads both models, fp16 files included."""
    src = load_base("tiny-random", device="cpu", dtype="fp32")
    save_single_file(src, tmp_path / "base.safetensors", dtype="fp16")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for comp, p in (("unet", ATTN), ("unet", CONV), ("text_encoder", TE_Q)):
            w = getattr(src, comp).get_submodule(p).weight
            w.add_(torch.randn(w.shape, generator=g) * 0.05)
    save_single_file(src, tmp_path / "tuned.safetensors", dtype="fp16")
    files = [str(tmp_path / f) for f in ("base.safetensors", "tuned.safetensors")]
    reports = extracted_without_loading(files, tmp_path, monkeypatch)
    assert {(r.component, r.path) for r in reports} == {("unet", ATTN), ("unet", CONV), ("text_encoder", TE_Q)}


def extracted_without_loading(inputs, tmp_path, monkeypatch):
    """Extract from ``inputs`` with no model loaded, check the LoRA bit-equal to the route that loads both models
    (built-in models' route), and give the streamed run's layer reports."""
    monkeypatch.setattr(tools, "_weights_of", tools._LoadedWeights)
    loaded, _ = tools.extract_lora(*inputs, tmp_path / "loaded.safetensors", rank=3, text_encoder=True)
    monkeypatch.undo()

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(tools, "load_base", no_load)
    streamed, reports = tools.extract_lora(*inputs, tmp_path / "streamed.safetensors", rank=3, text_encoder=True)
    monkeypatch.undo()
    assert [(c, p) for c, p, _ in streamed.items()] == [(c, p) for c, p, _ in loaded.items()]
    for (_, _, a), (_, _, b) in zip(streamed.items(), loaded.items()):
        assert a.tensors.keys() == b.tensors.keys() and a.alpha == b.alpha
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    return reports


@pytest.mark.parametrize("spec, dtype", [("tiny-random", "fp16"), ("tiny-xl-random", "fp32")])
def test_extract_reads_diffusers_folders_layer_by_layer_with_the_loaded_models_result(tmp_path, monkeypatch, spec,
                                                                                       dtype):
    """Two diffusers folders are read file by file too (SDXL's fp16 folders loaded in fp32 would take 21 GB); the
    LoRA is bit-equal to the route that loads both, both text encoders (and SDXL's projection) included."""
    src = load_base(spec, device="cpu", dtype=dtype)
    save_diffusers(src, tmp_path / "base")
    g = torch.Generator().manual_seed(4)
    def first(comp, end):  # the module's name in the component (SDXL's second encoder keeps ``text_model.``)
        return next(n for n, _ in getattr(src, comp).named_modules() if n.endswith(end))
    changed = [("unet", first("unet", "attn1.to_q")), ("unet", first("unet", "resnets.0.conv1"))]
    changed += [(te.component, first(te.component, TE_Q)) for te in src.family.text_encoders]
    with torch.no_grad():
        for comp, p in changed:
            w = getattr(src, comp).get_submodule(p).weight
            w.add_(torch.randn(w.shape, generator=g).to(w.dtype) * 0.05)
    save_diffusers(src, tmp_path / "tuned")
    reports = extracted_without_loading([str(tmp_path / f) for f in ("base", "tuned")], tmp_path, monkeypatch)
    assert {(r.component, r.path) for r in reports} == {(c, p.removeprefix("text_model.")) for c, p in changed}
    meta = load_lora(tmp_path / "streamed.safetensors").metadata
    named = ("modelspec.title", "modelspec.date")  # each file's own name, and when it was made
    assert {k: v for k, v in meta.items() if k not in named} == \
        {k: v for k, v in load_lora(tmp_path / "loaded.safetensors").metadata.items() if k in meta and k not in named}
    assert (meta["modelspec.title"], meta["modelspec.resolution"]) == ("streamed", "64x64")


def test_extract_of_identical_models_is_an_error(tmp_path, capsys):
    assert main(["lora", "extract", "--base", "tiny-random", "--tuned", "tiny-random", "--rank", "4",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no layer differs" in err and err.count("\n") == 1


def test_extract_refuses_to_write_over_its_inputs_and_bad_numbers(tmp_path, capsys):
    """--out naming --tuned replaced the fine-tuned checkpoint with the LoRA; --min-diff nan kept unchanged
    layers; --conv-rank None leaked into the message."""
    tuned = tmp_path / "tuned.safetensors"
    save_single_file(load_base("tiny-random", device="cpu", dtype="fp32"), tuned)
    before = tuned.read_bytes()
    for args, said in (
        (["--out", str(tuned)], f"{tuned}: is an input of this command; write to a new file"),
        (["--out", str(tmp_path / "x.safetensors"), "--min-diff", "nan"], "--min-diff nan: must be a number from 0"),
        (["--out", str(tmp_path / "x.safetensors"), "--min-diff", "-1"], "--min-diff -1.0: must be a number from 0"),
        (["--out", str(tmp_path / "x.safetensors"), "--rank", "0"], "--rank 0: must be 1 or more"),
    ):
        assert main(["lora", "extract", "--base", "tiny-random", "--tuned", str(tuned), "--rank", "4", *args]) == 2
        assert said in capsys.readouterr().err
    assert tuned.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["tuned.safetensors"]


def test_extract_given_a_lora_as_base_names_no_flag_it_lacks(base, tmp_path, capsys):
    """The message for a LoRA where a checkpoint goes said "a full checkpoint as --model", a flag extract lacks."""
    lora = lora_file(base, tmp_path / "style.safetensors", 0, rank=2, alpha=1.0)
    assert main(["lora", "extract", "--base", str(lora), "--tuned", "tiny-random", "--rank", "4",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{lora}: this is a LoRA/adapter file, not a base model; give it with --lora, and a full checkpoint in " \
           "its place" in err and "--model" not in err and err.count("\n") == 1


def test_merge_reruns_write_the_same_bytes(base, tmp_path):
    # safetensors keeps metadata in a hash map: unsorted, each run's header (and AutoV2 hash) came out different
    a = lora_file(base, tmp_path / "a.safetensors", 0, rank=2, alpha=1.0)
    b = lora_file(base, tmp_path / "b.safetensors", 1, rank=3, alpha=6.0)
    outs = [tmp_path / f"mix{i}.safetensors" for i in range(3)]
    for out in outs:
        assert main(["lora", "merge", f"{a}:0.5", f"{b}:1.0", "--out", str(out)]) == 0
    assert len(load_lora(outs[0]).metadata) > 5
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()


def test_a_merge_says_when_layers_need_their_full_svd(base, tmp_path):
    a = lora_file(base, tmp_path / "a.safetensors", 0, rank=2, alpha=1.0, loha_on=FF)
    b = lora_file(base, tmp_path / "b.safetensors", 1, rank=2, alpha=1.0, loha_on=FF)
    with pytest.warns(SdtuneWarning, match="LoHa/LoKr/full adapter meets another file's adapter: 1; each is merged"):
        _, reports = tools.merge_loras([(a, 1.0), (b, 1.0)], tmp_path / "m.safetensors")
    assert [r.path for r in reports] == [FF]
