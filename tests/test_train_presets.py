"""Model-aware defaults and named presets; every run prints and saves its settings; --config reruns a run."""

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from sdtune import families
from sdtune.cli import main
from sdtune.lora.formats import load_lora
from sdtune.safeio import SdtuneError
from sdtune.tiny import world
from sdtune.train import config, presets
from sdtune.train.config import LoraSettings, TISettings, load_settings, settings_for


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    scenes = world.concept_scenes(6, seed=5, style="outline")
    return world.write_dataset(tmp_path_factory.mktemp("data"), scenes, template=None, with_style=False)


def test_each_model_family_starts_from_its_own_preset():
    tiny = load_settings(None, {}, "lora", family="tiny")
    # the recipe that learns the held-out style on the built-in model (tests/test_train_quality.py)
    assert (tiny.preset, tiny.targets, tiny.rank, tiny.alpha, tiny.lr, tiny.batch_size, tiny.steps,
            tiny.min_snr_gamma, tiny.validation_split) == ("tiny", "all", 8, 8.0, 1e-3, 8, 300, 5.0, 0.1)
    sd1 = load_settings(None, {}, "lora", family=families.SD1)
    assert (sd1.preset, sd1.targets, sd1.rank, sd1.alpha, sd1.lr, sd1.resolution) == ("sd1", "attn+ff", 16, 8.0,
                                                                                        1e-4, 512)
    sdxl = load_settings(None, {}, "lora", family=families.SDXL)
    assert (sdxl.rank, sdxl.alpha, sdxl.resolution, sdxl.gradient_checkpointing) == (32, 16.0, 1024, True)
    ti = load_settings(None, {}, "ti", family="tiny")
    assert (ti.preset, ti.steps, ti.lr, ti.batch_size, ti.num_vectors) == ("tiny", 400, 5e-3, 4, 1)
    assert load_settings(None, {}, "ti", family="sd2").resolution == 0  # the model's own: 768-v or 512 base
    for family in families.FAMILIES.values():  # every family sdtune loads has one of each
        assert presets.for_family("lora", family) and presets.for_family("ti", family)
    # no family (a settings object built by hand): the dataclass defaults, no preset
    assert load_settings(None, {}, "lora") == LoraSettings()


def test_settings_for_a_loaded_model():
    from sdtune.models import load_base

    base = load_base("tiny-random")
    s = settings_for(base, "ti", data="d", out="o", token="<t>", init_token="star")
    assert isinstance(s, TISettings) and s.preset == "tiny" and s.steps == 400 and s.model == "tiny-random"


def test_precedence_preset_then_file_then_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("rank = 4\nlr = 0.5\n")
    s = load_settings(cfg, {"lr": 0.25}, "lora", family="tiny")
    assert (s.rank, s.lr, s.targets, s.steps) == (4, 0.25, "all", 300)  # file > preset, flag > file
    cfg.write_text('preset = "tiny-quick"\nrank = 4\n')
    assert load_settings(cfg, {}, "lora", family="sd1").steps == 30  # a named preset beats the model's
    s = load_settings(cfg, {"preset": "sd1"}, "lora", family="tiny")
    assert (s.preset, s.steps, s.rank, s.resolution) == ("sd1", 1500, 4, 512)  # the flag's preset; the file's rank
    # held-out images given: the preset's --validation-split gives way instead of clashing
    s = load_settings(None, {"data": "d", "out": "o", "validation_dir": "v"}, "lora", family="tiny")
    assert s.validation_split == 0.0
    s.check()
    with pytest.raises(SdtuneError, match="--validation-split and --validation-dir both given"):
        dataclasses.replace(s, validation_split=0.1).check()


def test_a_preset_gives_an_algorithm_its_own_learning_rate_and_the_file_and_flags_still_win(tmp_path, capsys):
    # LoKr on the tiny models at 3e-3 (at the LoRA's 1e-3 it learned the quality test's style in 53% of images)
    for name in ("tiny", "tiny-quick", "tiny-xl"):
        assert load_settings(None, {"algo": "lokr", "preset": name}, "lora").lr == 3e-3
        assert {load_settings(None, {"algo": a, "preset": name}, "lora").lr for a in ("lora", "loha", "dora")} == {1e-3}
    assert load_settings(None, {"algo": "lokr"}, "lora", family="tiny-xl").lr == 3e-3  # the model's preset too
    assert load_settings(None, {"algo": "lokr", "lr": 2e-4}, "lora", family="tiny").lr == 2e-4  # a flag wins
    cfg = tmp_path / "run.toml"
    cfg.write_text('algo = "lokr"\nlr = 5e-4\n')
    assert load_settings(cfg, {}, "lora", family="tiny").lr == 5e-4  # and the file
    cfg.write_text('algo = "lokr"\n')
    assert load_settings(cfg, {}, "lora", family="tiny").lr == 3e-3  # the file's algo picks the preset's lr
    assert load_settings(None, {"algo": "lokr"}, "lora", family="sd1").lr == 1e-4  # SD presets: no measured lr
    # ... but IA3's, which LyCORIS's authors put at 5e-3 to 1e-2 on SD (kohya's LoRA 1e-4 would barely move it)
    for family in ("sd1", "sd2", "sdxl"):
        ia3 = load_settings(None, {"algo": "ia3"}, "lora", family=family)
        assert (ia3.lr, ia3.targets) == (5e-3, "attn+ff")
        assert load_settings(None, {"algo": "ia3", "lr": 1e-2}, "lora", family=family).lr == 1e-2
        # and full's (whole weights) diffusers' DreamBooth fine-tuning lr
        assert load_settings(None, {"algo": "full"}, "lora", family=family).lr == 5e-6
    # IA3 at 1.5e-2 (tiny: on attention + feed-forward), BOFT (OFT's butterfly, from a flag or the file) at 3e-4
    for name, targets in (("tiny", "attn+ff"), ("tiny-xl", "all")):  # (on tiny-xl all layers learned more)
        ia3 = load_settings(None, {"algo": "ia3", "preset": name}, "lora")
        assert (ia3.lr, ia3.targets) == (1.5e-2, targets)
        assert load_settings(None, {"algo": "oft", "oft_butterfly": True, "preset": name}, "lora").lr == 3e-4
        assert load_settings(None, {"algo": "oft", "preset": name}, "lora").lr == 1e-3
        assert load_settings(None, {"algo": "full", "preset": name}, "lora").lr == 3e-4
    cfg.write_text('algo = "oft"\noft_butterfly = true\n')
    assert load_settings(cfg, {}, "lora", family="tiny").lr == 3e-4
    assert load_settings(None, {"algo": "ia3", "targets": "all"}, "lora", family="tiny").targets == "all"
    main(["train", "lora", "--list-presets"])
    assert "lr 1e-3 (LoKr 3e-3, BOFT and full 3e-4, IA3 1.5e-2 on attn+ff)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "lora", "--help"])
    assert re.search(r"--lr LR .*or the\s+preset's", capsys.readouterr().out, re.S)


def test_another_models_settings_file_says_its_preset_is_not_this_models(tmp_path, recwarn):
    cfg = tmp_path / "settings.toml"  # a run on the built-in SD 1.x model, given to a run on tiny-xl
    cfg.write_text('preset = "tiny"\nsteps = 5\n')
    with pytest.warns(UserWarning, match=r"settings\.toml: its preset 'tiny' is the built-in tiny model's, and this "
                                         r"model is the built-in tiny SDXL model, which starts from 'tiny-xl'; give "
                                         r"--preset tiny-xl"):
        s = load_settings(cfg, {}, "ti", family="tiny-xl")
    assert (s.preset, s.steps) == ("tiny", 5)  # the file's settings are used, as asked
    recwarn.clear()  # said only where it is news: the model's own preset, a chosen one, or a flag naming it
    cfg.write_text('preset = "tiny-quick"\n')
    load_settings(cfg, {}, "lora", family="tiny-xl")
    cfg.write_text('preset = "tiny"\n')
    load_settings(cfg, {"preset": "tiny"}, "ti", family="tiny-xl")
    load_settings(cfg, {}, "ti", family="tiny")
    assert not [w for w in recwarn if "preset" in str(w.message)]


def test_an_unknown_preset_is_one_line_naming_the_choices(dataset, tmp_path, capsys):
    with pytest.raises(SdtuneError, match=r"--preset 'tiny-quik': no such lora preset; did you mean 'tiny-quick'\? "
                                          r"choose one of tiny, tiny-quick, tiny-xl, sd1, sd2, sdxl"):
        load_settings(None, {"preset": "tiny-quik"}, "lora")
    assert main(["train", "ti", "--data", str(dataset), "--out", str(tmp_path), "--preset", "huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdtune: error: --preset 'huge': no such ti preset")


def test_list_presets_says_what_each_is_for(capsys):
    for kind in ("lora", "ti"):
        assert main(["train", kind, "--list-presets"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"{kind} presets")

        def line_of(name):
            return next(ln for ln in lines if ln.split()[0] == name)

        for preset in presets.PRESETS[kind].values():
            assert preset.purpose in line_of(preset.name)
        assert line_of("tiny").endswith("[default for the built-in tiny model]")
        assert line_of("tiny-xl").endswith("[default for the built-in tiny SDXL model]")
        assert "[default for SD 1.x]" in line_of("sd1")


def test_help_says_how_num_vectors_meets_a_longer_init_text(capsys):
    with pytest.raises(SystemExit):
        main(["train", "ti", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1 starts from their mean" in text and "N = T: one token each" in text and "A1111's rule" in text
    assert "--list-presets" in text and "the preset's" in text


def test_help_lists_every_setting_once_in_its_topics_section(capsys):
    """About a hundred flags read as sections (config.TOPICS): every setting of every kind has one topic, each kind's
    --help shows the sections it has settings in, each flag under its own, and the usage line stays short."""
    listed = [name for names in config.TOPICS.values() for name in names]
    assert len(listed) == len(set(listed))
    for kind, cls in config.KINDS.items():
        assert {f.name for f in dataclasses.fields(cls)} <= set(listed)
        with pytest.raises(SystemExit):
            main(["train", kind, "--help"])
        text = capsys.readouterr().out
        assert text.startswith(f"usage: sdtune train {kind} [--config FILE] [--data FOLDER] [--out FOLDER] "
                               f"[--model MODEL] [option ...]\n")
        sections = re.split(r"\n\n(?=[a-z][^\n]*:\n)", text)
        flags = {title.split(":\n")[0]: re.findall(r"^  (--[a-z0-9-]+)", title, re.M) for title in sections[1:]}
        mine = {t: [f"--{n.replace('_', '-')}" for n in names if n in {f.name for f in dataclasses.fields(cls)}]
                for t, names in config.TOPICS.items()}
        assert flags == {"options": ["--config", "--list-presets", "--print-settings", "--device", "--dtype"],
                         **{t: names for t, names in mine.items() if names}}
    assert "the network (LoRA and LyCORIS)" in flags and "--keep-last" in flags["saves, samples, validation and logs"]


def test_settings_are_printed_saved_and_rerun_identically(dataset, tmp_path, capsys):
    first = tmp_path / "first"
    args = ["train", "lora", "--data", dataset, "--out", first, "--model", "tiny-random", "--steps", "3",
            "--rank", "4", "--batch-size", "2", "--seed", "3", "--sample-steps", "2", "--no-progress"]
    # through the real entry point: nothing but sdtune's own lines on the terminal (no TensorBoard or
    # matplotlib import messages)
    run = subprocess.run([sys.executable, "-m", "sdtune.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines() == [str(first / "lora.safetensors")]
    err = run.stderr.splitlines()
    assert err[1].startswith("sdtune train lora: preset 'tiny'; validation on 1 held-out image(s); 64 px (the "
                             "model's own size); settings")  # the preset leaves --resolution 0
    assert all(re.match(r"(sdtune train lora: |  \w+=|step \d+: validation loss \d\.\d{8}$)", ln) for ln in err[1:]), err
    # the rank given without the alpha: the preset's alpha stays, so the LoRA's scale changes (said)
    assert err[0] == ("sdtune: warning: --rank 4 with preset tiny's alpha 8: the LoRA's scale alpha/rank is 2 (the "
                      "preset's 1); give --alpha to choose it")
    assert "  rank=4" in run.stderr or " rank=4 " in run.stderr
    # --no-progress is how this terminal watches, not a training setting: neither printed nor saved, so a
    # --config rerun elsewhere shows its bar
    assert "progress" not in run.stderr and "progress" not in (first / "settings.toml").read_text()
    saved = load_settings(first / "settings.toml", kind="lora")
    assert (saved.preset, saved.rank, saved.steps, saved.seed, saved.targets, saved.model) == (
        "tiny", 4, 3, 3, "all", "tiny-random")  # the flags, and the preset's values they did not touch
    # --config reruns it: the same settings (but --out) and the same LoRA, bit for bit
    second = tmp_path / "second"
    # in a fresh process too: bit-exactness holds for the same computation, and an in-process run after other
    # tests may run with other thread or float settings
    # (with its progress shown: stderr is no terminal here, so plain lines, as in a batch job's log)
    rerun = subprocess.run([sys.executable, "-m", "sdtune.cli", "train", "lora", "--config", str(first / "settings.toml"),
                            "--out", str(second)], capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "\r" not in rerun.stderr
    assert re.search(r"^train lora: 3/3 step, \d+ s, [\d.]+ step/s, loss=[\d.]+, lr=\S+$", rerun.stderr, re.M)
    assert load_settings(second / "settings.toml", kind="lora") == dataclasses.replace(saved, out=str(second))
    assert saved.progress
    a, b = load_lora(first / "lora.safetensors"), load_lora(second / "lora.safetensors")
    assert {(c, p) for c, p, _ in a.items()} == {(c, p) for c, p, _ in b.items()}
    for comp, path, ad in a.items():
        for role, tensor in ad.tensors.items():
            assert torch.equal(tensor, b.modules[comp][path].tensors[role]), (comp, path, role)
