"""sdtune's patched weights equal diffusers' (load_lora_weights + set_adapters + fuse_lora) on the tiny model.

Two LoRA files, one kohya (written key by key here, as kohya's trainer lays them out) and one diffusers/PEFT
(written by ``formats.save_lora``), with alphas that differ from the ranks and differ between modules, covering
UNet attention, feed-forward, 1x1 proj convs, a 3x3 resnet conv and text-encoder layers, mixed at [0.5, 1.0].
"""

import logging

import pytest
import torch
from safetensors.torch import save_file

from sdtune.lora.formats import load_lora, save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.lora.patch import LoraSet
from sdtune.tiny import model as tiny

pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline

WEIGHTS = [0.5, 1.0]
TE_ORACLE_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
UNET_ORACLE_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET_CONV = "down_blocks.1.resnets.0.conv1"


def _targets(parts):
    for comp, suffixes in (("unet", UNET_ORACLE_SUFFIXES), ("text_encoder", TE_ORACLE_SUFFIXES)):
        for path, m in parts[comp].named_modules():
            if path.endswith(suffixes) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                yield comp, path, m.weight.shape


def write_kohya(parts, path, seed=11, alphas=(6.0, 6.0)):
    """kohya layout: lora_unet_/lora_te_ names, lora_down/lora_up (rank 4), ``.alpha`` alternating over ``alphas``.

    The oracle file uses one alpha for all modules: diffusers 0.42 turns per-module kohya alphas into
    ``alpha_pattern`` keys that match no module (PEFT warns and ignores them), so every module then gets the
    most common alpha; sdtune applies each module's own alpha / rank, as kohya and A1111 do."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    targets = list(_targets(parts)) + [("unet", RESNET_CONV, parts["unet"].get_submodule(RESNET_CONV).weight.shape)]
    for i, (comp, p, shape) in enumerate(targets):
        prefix = "lora_unet_" if comp == "unet" else "lora_te_text_model_"
        name = prefix + p.replace(".", "_")
        r = 4
        kernel = tuple(shape[2:])
        sd[f"{name}.lora_down.weight"] = torch.randn(r, shape[1], *kernel, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], r, *((1, 1) if kernel else ()), generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alphas[i % 2])
    save_file(sd, str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": str(alphas[0])})


def write_diffusers(parts, path, seed=12):
    """diffusers/PEFT layout through sdtune's writer: rank 8 alpha 5, every third module rank 2 alpha 7."""
    g = torch.Generator().manual_seed(seed)
    lora = Lora(format="diffusers")
    for i, (comp, p, shape) in enumerate(_targets(parts)):
        r, alpha = (2, 7.0) if i % 3 == 0 else (8, 5.0)
        kernel = tuple(shape[2:])
        lora.modules[comp][p] = Adapter("lora", {
            "down": torch.randn(r, shape[1], *kernel, generator=g) * 0.3,
            "up": torch.randn(shape[0], r, *((1, 1) if kernel else ()), generator=g) * 0.3}, alpha)
    save_lora(lora, path, format="diffusers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("oracle")
    parts = tiny.build(seed=0)
    write_kohya(parts, d / "style_kohya.safetensors")
    write_diffusers(parts, d / "subject_diffusers.safetensors")
    return d / "style_kohya.safetensors", d / "subject_diffusers.safetensors"


@pytest.fixture(scope="module")
def diffusers_fused(files):
    """Component state dicts after diffusers fuses both adapters at WEIGHTS (then drops the LoRA layers)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    parts = tiny.build(seed=0)
    pipe = StableDiffusionPipeline(**{k: parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(files[0]), adapter_name="style")
    pipe.load_lora_weights(str(files[1]), adapter_name="subject")
    pipe.set_adapters(["style", "subject"], adapter_weights=WEIGHTS)
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["style", "subject"])
    pipe.unload_lora_weights()  # keeps the fused weights, removes the PEFT wrappers
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}


def test_kohya_plus_diffusers_at_half_and_one_equal_diffusers_fuse(files, diffusers_fused):
    base = tiny.build(seed=0)
    pristine = {c: {k: v.clone() for k, v in base[c].state_dict().items()} for c in ("unet", "text_encoder")}
    loras = LoraSet.attach(base)
    loras.add("style", load_lora(files[0], model_keys=loras.modules), WEIGHTS[0])
    loras.add("subject", files[1], WEIGHTS[1])
    touched = {(c, p) for name in ("style", "subject") for c, p in loras._entries[name].targets}
    assert ("unet", RESNET_CONV) in touched and any(c == "text_encoder" for c, _ in touched)
    assert len(touched) == len(list(_targets(base))) + 1

    worst = 0.0
    for comp in ("unet", "text_encoder"):
        mine = base[comp].state_dict()
        theirs = diffusers_fused[comp]
        assert set(mine) == set(theirs)
        for key, want in theirs.items():
            module = key.rsplit(".", 1)[0]
            got = mine[key]
            if (comp, module) in touched and key.endswith(".weight"):
                delta = (want.double() - pristine[comp][key].double()).norm()
                assert delta > 0, f"diffusers did not change {comp}.{key}"
                rel = ((got.double() - want.double()).norm() / delta).item()
                worst = max(worst, rel)
                assert rel < 1e-5, f"{comp}.{key}: relative error {rel:.2e}"
            else:
                assert torch.equal(got, want), f"{comp}.{key} should be untouched"
    print(f"worst relative error vs diffusers: {worst:.2e} over {len(touched)} layers")

    loras.set_weights({"style": 1.0, "subject": 0.5})
    loras.set_weights({"style": WEIGHTS[0], "subject": WEIGHTS[1]})  # back: recomputed from the pristine copy
    for comp in ("unet", "text_encoder"):
        mine = base[comp].state_dict()
        for module in {p for c, p in touched if c == comp}:
            key = f"{module}.weight"
            delta = (diffusers_fused[comp][key].double() - pristine[comp][key].double()).norm()
            assert ((mine[key].double() - diffusers_fused[comp][key].double()).norm() / delta) < 1e-5
    loras.remove_all()
    for comp in ("unet", "text_encoder"):
        for k, v in base[comp].state_dict().items():
            assert torch.equal(v, pristine[comp][k])


def test_per_module_kohya_alphas_scale_each_module_by_its_own_alpha(tmp_path):
    parts = tiny.build(seed=0)
    write_kohya(parts, tmp_path / "mixed.safetensors", alphas=(6.0, 2.0))
    pristine = {c: {k: v.clone() for k, v in parts[c].state_dict().items()} for c in ("unet", "text_encoder")}
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "mixed.safetensors"))
    loras = LoraSet.attach(parts)
    loras.add("mixed", tmp_path / "mixed.safetensors", 0.5)
    seen = set()
    for comp, path, _ in _targets(parts):
        name = ("lora_unet_" if comp == "unet" else "lora_te_text_model_") + path.replace(".", "_")
        alpha = raw[f"{name}.alpha"].item()
        seen.add(alpha)
        up, down = raw[f"{name}.lora_up.weight"].double(), raw[f"{name}.lora_down.weight"].double()
        w0 = pristine[comp][f"{path}.weight"].double()
        want = w0 + 0.5 * alpha / 4 * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        got = parts[comp].get_submodule(path).weight.double()
        assert ((got - want).norm() / (want - w0).norm()) < 1e-6, path
    assert seen == {6.0, 2.0}
