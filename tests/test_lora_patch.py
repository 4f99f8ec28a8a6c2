"""LoraSet: named adapters merged into the weights, reweighted and removed, always from the pristine base."""

import copy
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file

from sdtune.lora import formats, patch
from sdtune.lora.neutral import Adapter, Lora
from sdtune.lora.patch import LoraSet
from sdtune.safeio import SdtuneError
from sdtune.tiny import model as tiny

UNET_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_FF = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
TE_Q = "encoder.layers.1.self_attn.q_proj"
RESNET_CONV = "down_blocks.1.resnets.0.conv1"


def linear_targets(parts):
    """Every attention / feed-forward linear of the UNet and every text-encoder linear."""
    out = []
    for comp in ("unet", "text_encoder"):
        for path, m in parts[comp].named_modules():
            if isinstance(m, torch.nn.Linear) and any(s in path for s in ("attn1.", "attn2.", "ff.net", "self_attn.", "mlp.")):
                out.append((comp, path, m.weight.shape))
    return out


def random_lora(parts, seed, rank=4, alpha=3.0, every=1) -> Lora:
    g = torch.Generator().manual_seed(seed)
    lora = Lora(format="test")
    for i, (comp, path, shape) in enumerate(linear_targets(parts)):
        if i % every == 0:
            lora.modules[comp][path] = Adapter("lora", {"down": torch.randn(rank, shape[1], generator=g) * 0.2,
                                                        "up": torch.randn(shape[0], rank, generator=g) * 0.2}, alpha)
    return lora


def snapshot(parts):
    return {c: {k: v.clone() for k, v in parts[c].state_dict().items()} for c in ("unet", "text_encoder")}


def assert_same(parts, snap):
    for c in ("unet", "text_encoder"):
        for k, v in parts[c].state_dict().items():
            assert torch.equal(v, snap[c][k]), f"{c}.{k} differs"


def expected(w0, adapters_and_weights):
    w = w0.double()
    for ad, weight in adapters_and_weights:
        w = w + weight * ad.delta(w0.shape, dtype=torch.float64)
    return w


@pytest.fixture
def parts():
    return tiny.build(seed=0)


def weight_of(parts, comp, path):
    return parts[comp].get_submodule(path).weight


def test_add_merges_scaled_delta_into_unet_and_text_encoder(parts):
    base = snapshot(parts)
    a = random_lora(parts, 1, rank=4, alpha=3.0)
    s = LoraSet.attach(parts)
    s.add("a", a, weight=0.7)
    for comp, path in (("unet", UNET_ATTN), ("unet", UNET_FF), ("text_encoder", TE_Q)):
        want = expected(base[comp][path + ".weight"], [(a.modules[comp][path], 0.7)])
        got = weight_of(parts, comp, path)
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-6)
        assert not torch.equal(got, base[comp][path + ".weight"])
    # untouched layers are the very same values; biases are never changed
    assert torch.equal(weight_of(parts, "unet", RESNET_CONV), base["unet"][RESNET_CONV + ".weight"])
    assert torch.equal(parts["unet"].get_submodule(UNET_FF).bias, base["unet"][UNET_FF + ".bias"])
    assert s.names() == ["a"]
    row = s.list()[0]
    assert (row["unet_weight"], row["te_weight"]) == (0.7, 0.7)
    assert row["unet_layers"] == len(a.modules["unet"]) and row["te_layers"] == len(a.modules["text_encoder"])


def test_weights_above_one_negative_and_separate_text_encoder_weight(parts):
    base = snapshot(parts)
    a, b = random_lora(parts, 1), random_lora(parts, 2, rank=8, alpha=16.0)
    s = LoraSet.attach(parts)
    s.add("a", a, weight=1.8, te_weight=-0.5)
    s.add("b", b, weight=-1.0)
    for comp, path, wa, wb in (("unet", UNET_ATTN, 1.8, -1.0), ("text_encoder", TE_Q, -0.5, -1.0)):
        want = expected(base[comp][path + ".weight"], [(a.modules[comp][path], wa), (b.modules[comp][path], wb)])
        assert torch.allclose(weight_of(parts, comp, path).double(), want, rtol=0, atol=1e-6)
    s.set_weights({"a": (0.25, 2.0), "b": 0.5})
    for comp, path, wa, wb in (("unet", UNET_ATTN, 0.25, 0.5), ("text_encoder", TE_Q, 2.0, 0.5)):
        want = expected(base[comp][path + ".weight"], [(a.modules[comp][path], wa), (b.modules[comp][path], wb)])
        assert torch.allclose(weight_of(parts, comp, path).double(), want, rtol=0, atol=1e-6)
    assert [(r["name"], r["unet_weight"], r["te_weight"]) for r in s.list()] == [("a", 0.25, 2.0), ("b", 0.5, 0.5)]


def test_reweight_recomputes_only_layers_whose_sum_changed(parts, monkeypatch):
    a = random_lora(parts, 1)
    b = random_lora(parts, 2, every=3)  # touches a third of the layers
    s = LoraSet.attach(parts)
    s.add("a", a, 1.0)
    s.add("b", b, 1.0)
    written = []
    real = patch.write_patched
    monkeypatch.setattr(patch, "write_patched", lambda o, b, c: (written.append(o), real(o, b, c)))
    s.set_weights({"a": 1.0})  # unchanged
    assert written == []
    s.set_weights({"b": (1.0, 0.3)})  # only b's text-encoder layers
    assert len(written) == len(b.modules["text_encoder"])
    written.clear()
    s.set_weights({"b": (0.5, 0.3)})  # only b's UNet layers
    assert len(written) == len(b.modules["unet"])


def test_batch_writes_each_layer_once(parts, monkeypatch):
    a, b = random_lora(parts, 1), random_lora(parts, 2, every=2)
    written = []
    real = patch.write_patched
    monkeypatch.setattr(patch, "write_patched", lambda o, b_, c: (written.append(len(c)), real(o, b_, c)))
    s = LoraSet.attach(parts)
    with s.batch():
        s.add("a", a, 0.5)
        s.add("b", b, 1.0)
        assert written == []  # nothing computed inside the block
    assert len(written) == len(a)  # b's layers are a subset of a's: each layer once, with both adapters
    assert sorted(written).count(2) == len(b)
    fresh = tiny.build(seed=0)
    f = LoraSet.attach(fresh)
    f.add("a", a, 0.5)
    f.add("b", b, 1.0)
    for comp in ("unet", "text_encoder"):
        for k, v in fresh[comp].state_dict().items():
            assert torch.equal(parts[comp].state_dict()[k], v)


def test_layer_parallel_patch_gives_the_same_bits(parts):
    a, b = random_lora(parts, 1), random_lora(parts, 2, rank=8)
    LoraSet.attach(parts).add("a", a, 0.5)
    LoraSet.attach(parts).add("b", b, -1.0)
    other = tiny.build(seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = LoraSet.attach(other)
        with s.batch():
            s.add("a", a, 0.5)
            s.add("b", b, -1.0)
        assert torch.get_num_threads() == 2  # the caller's setting is given back
    finally:
        torch.set_num_threads(threads)
    for comp in ("unet", "text_encoder"):
        for k, v in other[comp].state_dict().items():
            assert torch.equal(parts[comp].state_dict()[k], v), k


def test_restore_gives_back_the_original_storage(parts):
    layer = parts["unet"].get_submodule(UNET_ATTN)
    original = layer.weight.data
    s = LoraSet.attach(parts)
    s.add("a", random_lora(parts, 1), 1.0)
    assert layer.weight.data_ptr() != original.data_ptr() and layer.weight is not None
    s.set_weights({"a": 2.0})
    s.remove_all()
    assert layer.weight.data_ptr() == original.data_ptr()


def test_remove_all_restores_bit_for_bit_after_a_messy_sequence(parts):
    base = snapshot(parts)
    a, b, c = random_lora(parts, 1), random_lora(parts, 2, rank=8, alpha=1.0, every=2), random_lora(parts, 3, every=5)
    s = LoraSet.attach(parts)
    s.add("a", a, 0.5)
    s.add("b", b, 1.3, te_weight=-0.7)
    s.set_weights({"a": 2.0, "b": (0.1, 0.9)})
    s.add("c", c, -1.0)
    s.remove("a")
    s.add("a", b, 0.3)  # same name, other LoRA: replaces
    s.set_weights({"c": 0.0})
    assert s.pristine_bytes() > 0
    s.remove_all()
    assert_same(parts, base)
    assert s.names() == [] and s.pristine_bytes() == 0


def test_any_sequence_ends_equal_to_a_fresh_patch(parts):
    a, b, c = random_lora(parts, 1), random_lora(parts, 2, rank=8, alpha=16.0), random_lora(parts, 3, every=2)
    s = LoraSet.attach(parts)
    s.add("b", b, 3.0)
    s.add("c", c, 1.0)
    s.add("a", a, -2.0, te_weight=0.1)
    s.set_weights({"a": 0.0, "b": (0.2, 0.2)})
    s.remove("c")
    s.set_weights({"a": 0.5, "b": 1.0})
    s.add("c", c, 0.7)
    s.remove("c")

    fresh = tiny.build(seed=0)
    f = LoraSet.attach(fresh)
    f.add("a", a, 0.5)  # other insertion order: the result must not depend on it
    f.add("b", b, 1.0)
    for comp in ("unet", "text_encoder"):
        mine, theirs = parts[comp].state_dict(), fresh[comp].state_dict()
        for k in theirs:
            assert torch.equal(mine[k], theirs[k]), f"{comp}.{k}"


def test_zero_weight_leaves_layers_exactly_at_base(parts):
    base = snapshot(parts)
    s = LoraSet.attach(parts)
    s.add("a", random_lora(parts, 1), 1.0)
    s.set_weights({"a": 0.0})
    assert_same(parts, base)
    assert s.pristine_bytes() == 0 and s.names() == ["a"]
    s.set_weights({"a": 1.0})
    assert not torch.equal(weight_of(parts, "unet", UNET_ATTN), base["unet"][UNET_ATTN + ".weight"])


def test_half_precision_model_sums_in_float32_then_casts(parts):
    for c in ("unet", "text_encoder"):
        parts[c].to(torch.bfloat16)
    base = snapshot(parts)
    a, b = random_lora(parts, 1), random_lora(parts, 2, rank=2, alpha=1.0)
    s = LoraSet.attach(parts)
    s.add("a", a, 0.5)
    s.add("b", b, 1.0)
    w0 = base["unet"][UNET_ATTN + ".weight"]
    want = (w0.double() + 0.5 * a.modules["unet"][UNET_ATTN].delta(w0.shape, torch.float64)
            + b.modules["unet"][UNET_ATTN].delta(w0.shape, torch.float64)).to(torch.bfloat16)
    got = weight_of(parts, "unet", UNET_ATTN)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -8  # within one bf16 step
    s.remove_all()
    assert_same(parts, base)


def test_pristine_copy_costs_the_touched_layers_once(parts):
    s = LoraSet.attach(parts)
    a = random_lora(parts, 1, every=2)
    s.add("a", a, 1.0)
    touched = sum(weight_of(parts, c, p).numel() * 4 for c, p, _ in a.items())
    assert s.pristine_bytes() == touched
    s.add("a2", a, 0.5)
    s.set_weights({"a": -1.0})
    assert s.pristine_bytes() == touched  # more adapters or reweights on the same layers cost nothing more
    s.remove("a")
    s.remove("a2")
    assert s.pristine_bytes() == 0


def test_weights_stay_merged_no_hooks_or_wrappers(parts):
    s = LoraSet.attach(parts)
    s.add("a", random_lora(parts, 1), 1.0)
    for comp in ("unet", "text_encoder"):
        for m in parts[comp].modules():
            assert not m._forward_hooks and not m._forward_pre_hooks
    assert type(parts["unet"].get_submodule(UNET_ATTN)) is torch.nn.Linear


def test_conv_locon_and_lycoris_kinds_use_their_delta(parts):
    base = snapshot(parts)
    g = torch.Generator().manual_seed(5)
    conv_shape = weight_of(parts, "unet", RESNET_CONV).shape  # [64, 32, 3, 3]
    attn_shape = weight_of(parts, "unet", UNET_ATTN).shape  # [32, 32]
    ff2 = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    ff2_shape = weight_of(parts, "unet", ff2).shape
    lora = Lora()
    lora.modules["unet"] = {
        RESNET_CONV: Adapter("lora", {"down": torch.randn(4, conv_shape[1], 3, 3, generator=g),
                                      "up": torch.randn(conv_shape[0], 4, 1, 1, generator=g)}, 2.0),
        UNET_ATTN: Adapter("loha", {k: torch.randn(*s, generator=g) for k, s in
                                    (("w1a", (32, 2)), ("w1b", (2, 32)), ("w2a", (32, 2)), ("w2b", (2, 32)))}, 1.0),
        UNET_FF: Adapter("diff", {"diff": torch.randn(weight_of(parts, "unet", UNET_FF).shape, generator=g)}),
        ff2: Adapter("lokr", {"w1": torch.randn(4, 8, generator=g), "w2a": torch.randn(ff2_shape[0] // 4, 2, generator=g),
                              "w2b": torch.randn(2, ff2_shape[1] // 8, generator=g)}, 4.0),
    }
    assert attn_shape == (32, 32)
    s = LoraSet.attach(parts)
    s.add("x", lora, 0.4)
    for path, ad in lora.modules["unet"].items():
        w0 = base["unet"][path + ".weight"]
        assert torch.allclose(weight_of(parts, "unet", path).double(), expected(w0, [(ad, 0.4)]), rtol=1e-6, atol=1e-5)
    s.remove_all()
    assert_same(parts, base)


def test_unmatched_and_misshapen_modules_refused_unless_partial(parts):
    base = snapshot(parts)
    lora = random_lora(parts, 1)
    lora.modules["unet"]["down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"] = Adapter(
        "lora", {"down": torch.zeros(4, 32), "up": torch.zeros(32, 4)})
    s = LoraSet.attach(parts)
    with pytest.raises(SdtuneError, match="down_blocks.7"):
        s.add("bad", lora, 1.0)
    assert_same(parts, base) and s.names() == []

    wide = random_lora(parts, 1)
    wide.modules["text_encoder"][TE_Q] = Adapter("lora", {"down": torch.zeros(4, 768), "up": torch.zeros(64, 4)})
    with pytest.raises(SdtuneError, match=TE_Q.replace(".", r"\.")):
        s.add("wide", wide, 1.0)
    assert_same(parts, base)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        s.add("bad", lora, 1.0, allow_partial=True)
    assert s.names() == ["bad"]
    assert s.list()[0]["unet_layers"] == len(lora.modules["unet"]) - 1  # every fitting module applied
    assert not torch.equal(weight_of(parts, "unet", UNET_ATTN), base["unet"][UNET_ATTN + ".weight"])


def test_unknown_names_are_clear_errors(parts):
    s = LoraSet.attach(parts)
    s.add("a", random_lora(parts, 1), 1.0)
    with pytest.raises(SdtuneError, match="no adapter named 'zz'.*loaded: a"):
        s.set_weights({"zz": 1.0})
    with pytest.raises(SdtuneError, match="no adapter named 'zz'"):
        s.remove("zz")
    with pytest.raises(SdtuneError, match="one number"):
        s.set_weights({"a": (1.0, 2.0, 3.0)})


def test_bad_weights_are_refused_before_anything_changes(parts):
    s = LoraSet.attach(parts)
    a = random_lora(parts, 1)
    s.add("a", a, 1.0)
    s.add("b", a, 0.5)
    before = snapshot(parts)
    with pytest.raises(SdtuneError, match=r"adapter weight 'x': give one number, \(unet_weight, text_encoder_weight\), "
                                          r"or a \{component: weight\} dict of unet, text_encoder$"):
        s.set_weights({"a": 0.3, "b": "x"})  # a's new weight is not taken either
    with pytest.raises(SdtuneError, match=r"a \{component: weight\} dict of unet, text_encoder$"):
        s.set_weights({"a": {"unet": 1, "te": 0.5}})
    with pytest.raises(SdtuneError, match="one number"):
        s.add("c", a, (1.0, "x"))
    with pytest.raises(SdtuneError, match="one number"):
        s.add("c", a, 1.0, te_weight=[0.5])
    assert [(r["name"], r["unet_weight"], r["te_weight"]) for r in s.list()] == [("a", 1.0, 1.0), ("b", 0.5, 0.5)]
    assert_same(parts, before)
    s.add("c", a, (2.0, None))  # None: the text encoder takes the UNet weight
    assert s.list()[2]["te_weight"] == 2.0


def test_attach_returns_the_one_set_of_a_model(parts):
    s = LoraSet.attach(parts)
    assert LoraSet.attach(parts) is s
    with pytest.raises(SdtuneError, match="already has a LoraSet"):
        LoraSet(parts["unet"], parts["text_encoder"])
    s.detach()
    assert LoraSet.attach(parts) is not s


def test_batched_adds_keep_each_weight_pair(parts):
    base = snapshot(parts)
    a, b = random_lora(parts, 1), random_lora(parts, 2)
    s = LoraSet.attach(parts)
    with s.batch():
        s.add("a", a, 0.5)
        s.add("b", b, (1.0, 0.0))  # a (unet, text encoder) pair as the weight
    assert [(r["unet_weight"], r["te_weight"]) for r in s.list()] == [(0.5, 0.5), (1.0, 0.0)]
    w0 = base["text_encoder"][TE_Q + ".weight"]
    want = expected(w0, [(a.modules["text_encoder"][TE_Q], 0.5)])
    assert torch.allclose(weight_of(parts, "text_encoder", TE_Q).double(), want, rtol=0, atol=1e-6)
    s.remove_all()
    assert_same(parts, base)


def test_add_from_files_given_as_path_or_str(parts, tmp_path):
    a = random_lora(parts, 1)
    path = tmp_path / "style.safetensors"
    formats.save_lora(a, path, format="kohya")
    s = LoraSet.attach(parts)
    with s.batch():
        s.add("style", path, 0.8)
        s.add("style_2", str(path), 0.1)
    assert [(r["name"], r["source"], r["unet_layers"]) for r in s.list()] == [
        ("style", str(path), len(a.modules["unet"])), ("style_2", str(path), len(a.modules["unet"]))]
    fresh = tiny.build(seed=0)
    w0 = fresh["unet"].get_submodule(UNET_FF).weight.detach().clone()
    LoraSet.attach(fresh).add("x", a, 0.9)
    got, want = weight_of(parts, "unet", UNET_FF), weight_of(fresh, "unet", UNET_FF)
    assert not torch.equal(got, w0)
    # Two computations: W0 + [0.8·s·up | 0.1·s·up] @ [down; down] (rank 8) against W0 + 0.9·s·up @ down (rank 4),
    # each one fp32 addmm. A k-term fp32 dot product is off by at most ~k·eps·Σ|terms|; with k <= 9 on each
    # side, 18·eps times (|W0| + 0.9·s·|up|@|down|) bounds their difference.
    ad = a.modules["unet"][UNET_FF]
    terms = w0.abs() + 0.9 * ad.scale * (ad.tensors["up"].abs() @ ad.tensors["down"].abs())
    assert ((got - want).abs() <= 18 * torch.finfo(torch.float32).eps * terms).all()


def test_a_model_with_loras_is_freed_with_its_set():
    import gc
    import weakref

    parts = tiny.build(seed=0)
    LoraSet.attach(parts).add("a", random_lora(parts, 1), 1.0)
    ref = weakref.ref(parts["unet"])
    del parts
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_model_with_originals_on_cpu():
    parts = tiny.build(seed=0)
    for c in ("unet", "text_encoder"):
        parts[c].to("cuda", torch.float16)
    base = {c: {k: v.clone() for k, v in parts[c].state_dict().items()} for c in ("unet", "text_encoder")}
    a = random_lora(parts, 1)
    s = LoraSet.attach(parts, pristine_device="cpu")
    s.add("a", a, 0.5)
    assert all(layer.pristine.device.type == "cpu" for layer in s._layers.values())
    w0 = base["unet"][UNET_ATTN + ".weight"].cpu()
    want = (w0.double() + 0.5 * a.modules["unet"][UNET_ATTN].delta(w0.shape, torch.float64)).half()
    got = weight_of(parts, "unet", UNET_ATTN)
    assert got.device.type == "cuda" and (got.cpu().float() - want.float()).abs().max() <= 2e-3
    s.set_weights({"a": -1.0})
    s.remove_all()
    assert_same(parts, base)


def test_a_failed_patch_changes_nothing_and_the_originals_stay(parts, monkeypatch):
    """A layer that cannot be patched (out of memory, an adapter that breaks on it) fails the call, which then
    changes nothing: the adapters stay as they were, and the originals are never lost. Before, the failed
    adapter stayed listed and its layers' originals were taken for patched copies, so the next change wrote W'
    over the only copy of W0 and no remove gave it back."""
    base = snapshot(parts)
    a, b = random_lora(parts, 1), random_lora(parts, 2, every=3)
    s = LoraSet.attach(parts)
    real, calls = patch.write_patched, []

    def fail_on_the_fifth(*args):  # one layer of the call fails, the others are written
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        real(*args)

    monkeypatch.setattr(patch, "write_patched", fail_on_the_fifth)
    with pytest.raises(RuntimeError, match="simulated"):
        s.add("a", a, 0.5)  # first touch of every layer
    assert s.names() == [] and s.pristine_bytes() == 0
    assert_same(parts, base)

    monkeypatch.setattr(patch, "write_patched", real)
    s.add("a", a, 0.5)
    with_a = snapshot(parts)
    for change in (lambda: s.add("a", b, 0.7), lambda: s.add("b", b, 1.0), lambda: s.set_weights({"a": 2.0})):
        calls.clear()
        monkeypatch.setattr(patch, "write_patched", fail_on_the_fifth)
        with pytest.raises(RuntimeError, match="simulated"):
            change()  # layers patched before, written in place
        monkeypatch.setattr(patch, "write_patched", real)
        assert s.names() == ["a"] and s.list()[0]["unet_weight"] == 0.5
        assert_same(parts, with_a)
    s.remove("a")
    assert_same(parts, base)


# ---------------------------------------------------------------- beside other code that changes the model

def test_changes_from_two_threads_restore_exactly(parts, tmp_path):
    """Without a lock, two threads adding at once each took the other's patched weight for an original, and no
    remove gave the base back (0 to 55 layers in an audit's six trials)."""
    before = snapshot(parts)
    s = LoraSet.attach(parts)
    for trial in range(4):
        threads = [threading.Thread(target=s.add, args=(f"l{i}", random_lora(parts, 10 * trial + i), 0.7))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(s.names()) == ["l0", "l1", "l2"]
        s.remove_all()
        assert_same(parts, before)


def test_a_copied_model_has_its_own_set(parts):
    s = LoraSet.attach(parts)
    s.add("a", random_lora(parts, 1))
    copied = copy.deepcopy(parts)
    twin = LoraSet.attach(copied)
    assert twin is not s and twin.names() == ["a"] and twin.modules["unet"] is copied["unet"]
    twin.remove_all()
    assert_same(copied, snapshot(tiny.build(seed=0)))
    assert s.names() == ["a"]


def test_a_swapped_component_gets_a_new_set_or_is_refused(parts):
    s = LoraSet.attach(parts)
    s.add("a", random_lora(parts, 1))
    other = tiny.build(seed=1)["unet"]
    swapped = dict(parts, unet=other)  # e.g. a fine-tuned UNet put into the pipeline
    with pytest.raises(SdtuneError, match=r"the model's unet was replaced while LoRAs are merged into the old one "
                                          r"\(a\); remove them first"):
        LoraSet.attach(swapped)
    s.remove_all()
    fresh = LoraSet.attach(swapped)
    assert fresh is not s and fresh.modules["unet"] is other
    w0 = other.get_submodule(UNET_ATTN).weight.detach().clone()
    fresh.add("a", random_lora(parts, 1))
    assert not torch.equal(other.get_submodule(UNET_ATTN).weight, w0)  # the new UNet is patched


def test_layers_changed_by_other_code_are_refused_and_nothing_is_lost(parts):
    """A recompute from the originals would silently undo (or be undone by) what diffusers did to the layer: a
    fused LoRA (PEFT's merged adapters), fused q/k/v projections, weights offloaded to the meta device."""
    s = LoraSet.attach(parts)
    s.add("a", random_lora(parts, 1), 0.5)
    patched = snapshot(parts)
    layer = parts["unet"].get_submodule(UNET_ATTN)
    layer.merged_adapters = ["d"]  # what PEFT's merge (diffusers' fuse_lora) leaves on a tuner layer
    for change in (lambda: s.set_weights({"a": 0.2}), lambda: s.remove("a"), s.remove_all):
        with pytest.raises(SdtuneError, match=rf"unet:{UNET_ATTN}: diffusers/PEFT fused a LoRA into this layer"):
            change()
    assert s.names() == ["a"] and s.list()[0]["unet_weight"] == 0.5
    assert_same(parts, patched)
    del layer.merged_adapters
    parts["unet"].fuse_qkv_projections()
    with pytest.raises(SdtuneError, match=r"projections are fused \(fuse_qkv_projections\)"):
        s.set_weights({"a": 0.2})
    parts["unet"].unfuse_qkv_projections()
    s.remove_all()
    offloaded = tiny.build(seed=0)
    offloaded["unet"].get_submodule(UNET_ATTN).to("meta")
    with pytest.raises(SdtuneError, match=r"its weights are offloaded \(on the meta device"):
        LoraSet.attach(offloaded).add("a", random_lora(offloaded, 1))


def test_other_inputs_a_python_user_may_give(parts, tmp_path):
    before = snapshot(parts)
    s = LoraSet.attach(parts)
    lora = random_lora(parts, 2)
    formats.save_lora(lora, tmp_path / "a.safetensors")
    s.add("file", tmp_path / "a.safetensors", 0.5)
    from_file = snapshot(parts)
    s.remove_all()
    s.add("dict", load_file(str(tmp_path / "a.safetensors")), 0.5)  # a state dict, as diffusers takes one
    assert_same(parts, from_file)
    s.remove_all()
    with pytest.raises(SdtuneError, match=r"LoRA 'b': give a file path, a Lora or a dict of tensors, not a bytes"):
        s.add("b", b"\x00")
    for bad in (float("nan"), float("inf"), (1.0, float("nan"))):
        with pytest.raises(SdtuneError, match="must be a finite number"):
            s.add("n", lora, bad)
    assert_same(parts, before)
    # a torch.compile'd component: its parameters are the model's, patched as they are
    unet_only = Lora(modules={"unet": dict(lora.modules["unet"]), "text_encoder": {}, "text_encoder_2": {}})
    compiled = LoraSet(unet=torch.compile(tiny.build(seed=0)["unet"]))
    compiled.add("a", unet_only)
    assert len(compiled.list()) == 1 and compiled.list()[0]["unet_layers"] > 0
    # a PEFT model (get_peft_model): its layers under base_model.model., the LoRA layers' base weights patched
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny.build(seed=0)["unet"], peft.LoraConfig(r=2, target_modules=["to_k"]))
    w0 = wrapped.get_base_model().get_submodule(UNET_ATTN).weight.detach().clone()
    on_peft = LoraSet.attach({"unet": wrapped})
    on_peft.add("a", unet_only)
    assert on_peft.list()[0]["unet_layers"] == len(unet_only.modules["unet"])
    assert not torch.equal(wrapped.get_base_model().get_submodule(UNET_ATTN).weight, w0)
    on_peft.remove_all()
    assert torch.equal(wrapped.get_base_model().get_submodule(UNET_ATTN).weight, w0)


def test_a_channels_last_conv_is_patched_and_restored(parts):
    """After ``unet.to(memory_format=torch.channels_last)`` a reweight wrote through a view the layout does not
    allow (a traceback); the layer keeps its layout."""
    conv = parts["unet"].get_submodule(RESNET_CONV)
    w0 = conv.weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    lora = Lora(modules={"unet": {RESNET_CONV: Adapter("lora", {"down": torch.randn(2, 32, 3, 3, generator=g),
                                                                 "up": torch.randn(64, 2, 1, 1, generator=g)}, 1.0)},
                         "text_encoder": {}, "text_encoder_2": {}})
    s = LoraSet.attach(parts)
    s.add("c", lora, 0.5)
    parts["unet"].to(memory_format=torch.channels_last)
    s.set_weights({"c": 0.25})
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    want = w0.double() + 0.25 * lora.modules["unet"][RESNET_CONV].delta(w0.shape, dtype=torch.float64)
    torch.testing.assert_close(conv.weight.double(), want)
    s.remove_all()
    assert torch.equal(conv.weight, w0)
