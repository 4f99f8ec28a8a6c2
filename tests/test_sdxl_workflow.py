"""A new user's SDXL session through the real command: a single-file SDXL checkpoint (SGM layout), a kohya
LoRA with SGM-style UNet names and both text encoders, and a clip_l/clip_g embedding, with no flag that names
the family: inspect, generate, merge into a single file and into a folder."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sdtune import families
from sdtune.generate import parse_infotext, read_infotext
from sdtune.ldm import unet_module_map
from sdtune.models import load_base, save_single_file


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdtune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("xl")
    base = load_base("sdxl-small-random", device="cpu")
    checkpoint = save_single_file(base, d / "my-xl-finetune.safetensors")
    sgm = {diffusers: ldm for ldm, diffusers in unet_module_map(base.unet.config).items()}
    g = torch.Generator().manual_seed(0)
    lora = {}
    targets = [("lora_unet_" + sgm[p].replace(".", "_"), m) for p, m in base.unet.named_modules()
               if p.endswith(("attn1.to_q", "attn2.to_k", "ff.net.2")) and p in sgm]
    for te in families.SDXL.text_encoders:
        model = getattr(base, te.component)
        targets += [(te.kohya_prefix + ("text_model." + p.removeprefix("text_model.")).replace(".", "_"), m)
                    for p, m in model.named_modules() if p.endswith("self_attn.q_proj")]
    for name, module in targets:
        lora[f"{name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.2
        lora[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.2
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, d / "pixel-xl.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, d / "xl-detail.safetensors")
    return d, checkpoint, d / "pixel-xl.safetensors", d / "xl-detail.safetensors"


def test_inspect_names_the_family_and_components(files):
    _, _, lora, _ = files
    r = run_cli("inspect", lora, "--json")
    assert r.returncode == 0 and r.stderr == ""
    info = json.loads(r.stdout)
    assert info["family"] == "sdxl" and set(info["modules"]) == {"unet", "text_encoder", "text_encoder_2"}


def test_generate_with_lora_and_embedding(files, tmp_path):
    _, checkpoint, lora, emb = files
    common = ["--model", checkpoint, "--prompt", "xl-detail, a castle", "--steps", "2", "--seed", "3",
              "--no-progress"]
    plain = run_cli("generate", *common, "--out", tmp_path / "plain")
    mixed = run_cli("generate", *common, "--out", tmp_path / "mixed", "--lora", f"{lora}:0.8",
                    "--embedding", emb)
    assert plain.returncode == 0 and mixed.returncode == 0, plain.stderr + mixed.stderr
    assert mixed.stderr == ""  # no library noise, nothing skipped
    png = mixed.stdout.split()[-1]
    info = parse_infotext(read_infotext(png))
    assert info["Size"] == "64x64" and info["Lora weights"] == "pixel-xl=0.8" and info["prompt"].startswith("xl-detail")
    assert open(png, "rb").read() != open(plain.stdout.split()[-1], "rb").read()


@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged-folder"])
def test_merge_equals_the_in_memory_patch(files, tmp_path, out_name):
    _, checkpoint, lora, _ = files
    out = tmp_path / out_name
    r = run_cli("merge", "--model", checkpoint, "--lora", f"{lora}:0.8", "--out", out)
    assert r.returncode == 0, r.stderr
    expected = load_base(str(checkpoint), device="cpu")
    expected.loras.add("pixel", lora, 0.8)
    merged = load_base(str(out), device="cpu")
    assert merged.family is families.SDXL
    for name, module in expected.modules().items():
        got = getattr(merged, name).state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(got[key], value), (name, key)  # the same patch code on the same weights
