"""Whole training runs on SDXL and SD 2.x through the real command.

- SDXL TI killed (SIGKILL, in the middle of a step) and run again continues from its last save: the resume
  state holds the clip_l and the clip_g rows, the second run does only the remaining steps, and its final
  embedding equals, bit for bit, that of a run never interrupted. All three runs are fresh processes of the
  same command on one thread, so the comparison is of the same computation.
- LoRA on a small SD 2.x-architecture diffusers folder (OpenCLIP's 1024-wide text, linear projections,
  v-prediction): every loss of the run is the error against diffusers' ``get_velocity``, and both written files
  load in diffusers' ``StableDiffusionPipeline`` (read from the same folder) with no unmatched key.
"""

import io
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_sdxl import _adapters, _complaints

from sdtune import cli, families, models
from sdtune.lora.formats import load_lora
from sdtune.safeio import load_state
from sdtune.train import loop
from sdtune.train.objective import Objective


def square_images(folder, colours):
    """One 64x64 image per colour: a coloured square on white."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        img = Image.new("RGB", (64, 64), "white")
        img.paste(Image.new("RGB", (32, 32), colour), (16, 16))
        img.save(folder / f"{i}.png")
    return folder


# ---------------------------------------------------------------- SDXL TI: kill and resume

# The command in a fresh process on one thread. KILL_AT=n: SIGKILL itself as the n-th optimizer step begins (a
# real kill: no exception, no cleanup). It reports how many optimizer steps it began, on its last line.
CHILD = textwrap.dedent("""
    import atexit, os, signal, sys, torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    torch.set_num_threads(1)
    from sdtune import cli
    kill_at, began = int(os.environ.get("KILL_AT", "0")), [0]

    def hook(optimizer, args, kwargs):
        began[0] += 1
        if began[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_pre_hook(hook)
    atexit.register(lambda: print(f"optimizer steps: {began[0]}", flush=True))
    sys.exit(cli.main(sys.argv[1:]))
""")


def ti_command(data, out) -> list[str]:
    return [sys.executable, "-c", CHILD, "train", "ti", "--model", "sdxl-small-random", "--data", str(data),
            "--out", str(out), "--token", "<sq>", "--init-token", "square", "--steps", "4", "--save-every", "2",
            "--batch-size", "1", "--grad-accum", "1", "--resolution", "64", "--lr", "5e-2", "--flip",
            "--sample-every", "0", "--no-report", "--no-progress", "--device", "cpu", "--dtype", "fp32",
            "--no-gradient-checkpointing"]


def test_sdxl_ti_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    data = square_images(tmp_path / "data", ["red", "blue"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # the uninterrupted run and the killed one at the same time (one thread each)
    whole = subprocess.Popen(ti_command(data, tmp_path / "whole"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    cut = subprocess.run(ti_command(data, tmp_path / "cut"), env={**env, "KILL_AT": "3"}, capture_output=True,
                         text=True, timeout=600, check=False)
    whole_out, whole_err = whole.communicate(timeout=600)
    assert whole.returncode == 0, whole_err[-3000:]
    assert whole_out.strip().splitlines()[-1] == "optimizer steps: 4"
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]

    # killed during step 3: the state of the save at step 2 holds both encoders' rows, as the step-2 file does
    state, _ = load_state(tmp_path / "cut" / loop.STATE_FILE)
    saved = load_file(str(tmp_path / "cut" / "learned_embeds-step000002.safetensors"))
    assert state["step"] == 2 and not (tmp_path / "cut" / "learned_embeds.safetensors").exists()
    assert {k: tuple(v.shape) for k, v in state["trainable"].items()} == {"rows.clip_l": (1, 768),
                                                                         "rows.clip_g": (1, 1280)}
    assert torch.equal(state["trainable"]["rows.clip_l"], saved["clip_l"])
    assert torch.equal(state["trainable"]["rows.clip_g"], saved["clip_g"])
    moments = state["optimizer"]["state"]  # and Adam's moments of each, after two steps
    assert sorted(tuple(m["exp_avg"].shape) for m in moments.values()) == [(1, 768), (1, 1280)]
    assert all(int(m["step"]) == 2 for m in moments.values())

    again = subprocess.run(ti_command(data, tmp_path / "cut"), env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == "optimizer steps: 2"  # steps 3 and 4 only
    a = load_file(str(tmp_path / "whole" / "learned_embeds.safetensors"))
    b = load_file(str(tmp_path / "cut" / "learned_embeds.safetensors"))
    assert a.keys() == b.keys() == {"clip_l", "clip_g"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert not torch.equal(b[key], saved[key])  # steps 3 and 4 moved it on from the save


# ---------------------------------------------------------------- SD 2.x: a v-prediction LoRA

def small_sd2_folder(folder):
    """A random-init SD 2.x-architecture diffusers folder: SD 2.x's shipped configs (linear projections, 1024-wide
    OpenCLIP text encoder, v-prediction DDIM scheduler) at small widths and two text layers."""
    configs = families.SD2.component_configs()
    configs["unet"] |= {"block_out_channels": (32, 64, 64, 64), "attention_head_dim": (1, 2, 2, 2), "sample_size": 8,
                        "layers_per_block": 1}
    configs["vae"] |= {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64}
    configs["text_encoder"] |= {"num_hidden_layers": 2, "intermediate_size": 256}
    assert configs["scheduler"]["prediction_type"] == "v_prediction"
    torch.manual_seed(0)
    te = families.SD2.text_encoders[0]
    base = models.Base(**models.build_parts(families.SD2, configs), tokenizer=models.tokenizer_for(te),
                       scheduler=models.make_scheduler(families.SD2, configs["scheduler"]), device=torch.device("cpu"),
                       dtype=torch.float32, name="sd2-small", source="test", single_file=None, model_hash="0" * 10,
                       family=families.SD2)
    return models.save_diffusers(base, folder)


def test_sd2_lora_trains_on_the_velocity_and_loads_in_diffusers(tmp_path, diffusers_says):
    folder = small_sd2_folder(tmp_path / "sd2")
    data = square_images(tmp_path / "data", ["red", "green", "blue", "orange"])
    for i, colour in enumerate(["red", "green", "blue", "orange"]):
        (data / f"{i}.txt").write_text(f"a {colour} square")
    calls, preds = [], []
    errors, forward = Objective.errors, UNet2DConditionModel.forward

    def recording_errors(self, latents, noise, timesteps, *a, **k):
        got = errors(self, latents, noise, timesteps, *a, **k)
        calls.append((latents.detach().clone(), noise.detach().clone(), timesteps.clone(), got.detach().clone()))
        return got

    def recording_forward(self, sample, timestep, *a, **k):
        out = forward(self, sample, timestep, *a, **k)
        preds.append((sample.detach().clone(), out.sample.detach().clone()))
        return out

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        mp.setattr(Objective, "errors", recording_errors)
        mp.setattr(UNet2DConditionModel, "forward", recording_forward)
        code = cli.main(["train", "lora", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"),
                         "--steps", "2", "--batch-size", "2", "--resolution", "64", "--rank", "4", "--alpha", "4",
                         "--targets", "attn+ff", "--text-encoder", "--clip-skip", "2", "--lr", "1e-3",
                         "--formats", "kohya", "diffusers",
                         "--sample-every", "0", "--no-report", "--no-progress", "--device", "cpu", "--dtype", "fp32",
                         "--no-gradient-checkpointing"])
    assert code == 0, err.getvalue()[-2000:]
    kohya = tmp_path / "run" / "lora.safetensors"
    assert out.getvalue().strip().splitlines()[-1] == str(kohya)

    # every loss of the run (validation at the start and end, the two training steps) against diffusers' velocity
    oracle = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert oracle.config.prediction_type == "v_prediction"
    assert len(calls) == len(preds) >= 4
    against_noise = []
    for (z0, noise, t, got), (fed, pred) in zip(calls, preds):
        assert torch.allclose(fed, oracle.add_noise(z0, noise, t), atol=1e-5)
        velocity = oracle.get_velocity(z0, noise, t)
        assert torch.allclose(got, (pred - velocity).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)
        against_noise.append((got - (pred - noise).pow(2).mean(dim=(1, 2, 3))).abs() / got)
    assert torch.cat(against_noise).max() > 0.05  # epsilon's loss would differ (v is near the noise at small t)
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"  # kohya's name
    assert meta["ss_v_parameterization"] == "True"
    assert meta["ss_clip_skip"] == "None"  # A1111's 2 on SD 2.x is the default layer: sd-scripts' 1 (unset)
    # the diffusers file of the same run says so too (a conversion of it to kohya's layout kept epsilon's name)
    with safe_open(str(tmp_path / "run" / "diffusers" / "pytorch_lora_weights.safetensors"), "pt") as f:
        same = f.metadata()
    assert (same["ss_base_model_version"], same["ss_v_parameterization"]) == ("sd_v2_v", "True")

    # diffusers reads the folder and loads both files with every key matched, each on the trained layers only
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    lora = load_lora(kohya)
    assert {comp for comp, paths in lora.modules.items() if paths} == {"unet", "text_encoder"}
    for name, file in (("k", kohya), ("d", tmp_path / "run" / "diffusers" / "pytorch_lora_weights.safetensors")):
        said = diffusers_says(lambda: pipe.load_lora_weights(str(file), adapter_name=name))
        assert not _complaints(said), (name, _complaints(said)[:5])
        for comp in ("unet", "text_encoder"):
            assert set(_adapters(getattr(pipe, comp), name)) == set(lora.modules[comp]), (name, comp)
        pipe.delete_adapters(name)
