"""Bad input through the real entry points: one line naming the file (or flag) and the fix, before the work,
nothing lost, no library noise. Each case here was once a traceback, a silent wrong result or a wait."""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdtune import safeio
from sdtune.cli import main
from sdtune.lora.formats import save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.safeio import SdtuneError, load_state, output_folder


@pytest.fixture(scope="module")
def lora_file(base, tmp_path_factory):
    """A small LoRA on the UNet's first attention projection."""
    path = next(p for p, m in base.unet.named_modules() if isinstance(m, torch.nn.Linear) and "attn1.to_q" in p)
    out_f, in_f = base.unet.get_submodule(path).weight.shape
    g = torch.Generator().manual_seed(0)
    lora = Lora(format="test")
    lora.modules["unet"][path] = Adapter("lora", {"down": torch.randn(2, in_f, generator=g),
                                                  "up": torch.randn(out_f, 2, generator=g)}, 2.0)
    file = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_lora(lora, file)
    return file


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("after", [0.7, 1.8])  # inside torch's import, or the commands' (after the parse)
def test_ctrl_c_while_the_command_starts_is_one_line(after):
    exe = shutil.which("sdtune")
    if exe is None:
        pytest.skip("the sdtune command is not installed (pip install -e .)")
    proc = subprocess.Popen([exe, "inspect", "nothing.safetensors"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(after)  # inside torch's and diffusers' imports, which take seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 2: the command had finished (a fast machine); -SIGINT: it had, and the signal came while Python shut down,
    # after the process's handlers are gone (a shell says 130, as for the 130 of an interrupted command)
    assert proc.returncode in (130, 2, -signal.SIGINT), err
    assert "Traceback" not in err and err.strip() in ("sdtune: interrupted",
                                                      "sdtune: error: nothing.safetensors: no such file; check the path")


def test_python_dash_m_sdtune_is_the_command_and_a_closed_pipe_ends_it_quietly(lora_file):
    """``python -m sdtune`` runs the command (its Ctrl-C while importing is one line too), and output piped into a
    reader that has stopped (``| head``) ends it without a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "sdtune", "inspect", str(lora_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err
    proc = subprocess.Popen([sys.executable, "-m", "sdtune", "inspect", "nothing.safetensors"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and proc.returncode in (130, 2), err


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, lora_file, capsys, monkeypatch):
    """safetensors' own write error is no OSError, and PIL's names no file: both used to end in a traceback. Nothing
    is left behind."""
    from PIL import Image
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safeio, "save_file", full)
    out = tmp_path / "x.safetensors"
    assert main(["convert", str(lora_file), str(out), "--to", "diffusers"]) == 2
    assert _error(capsys).startswith(f"sdtune: error: {out}: could not be written (Error while serializing: I/O "
                                     f"error: No space left on device (os error 28)); free some space")
    monkeypatch.undo()

    def no_space(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", no_space)
    assert main(["generate", "--model", "tiny-random", "--prompt", "a", "--steps", "1", "--seed", "1",
                 "--out", str(tmp_path / "g")]) == 2
    assert re.fullmatch(rf"sdtune: error: {tmp_path / 'g'}/00000-1\.png: No space left on device; .*\n", _error(capsys))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["g"]


def test_files_that_are_not_weights_say_what_they_are(tmp_path, code_pickle):
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(SdtuneError, match=r"photo.png: a PNG image, not a weight file; give a .safetensors"):
        load_state(png)
    config = tmp_path / "adapter_config.json"
    config.write_text('{"r": 4, "lora_alpha": 4}')
    with pytest.raises(SdtuneError, match=r"a JSON file, not a weight file.*adapter_model.safetensors"):
        load_state(config)
    # a pickle with code is refused as before, whatever its protocol, and torch's note on protocols stays quiet
    marker = tmp_path / "ran"
    evil = code_pickle(tmp_path / "evil.pt", "w", marker, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SdtuneError, match="refuses to unpickle"):
            load_state(evil)
    assert not caught and not marker.exists()


def test_outputs_where_nothing_can_be_written_stop_before_the_work(tmp_path, lora_file, capsys, monkeypatch):
    plain = tmp_path / "plainfile"
    plain.write_text("data")
    assert main(["merge", "--model", "tiny-random", "--lora", str(lora_file), "--out", str(plain)]) == 2
    assert "plainfile: is a file, not a folder" in _error(capsys) and plain.read_text() == "data"
    for out in ("out.ckpt", "out.pt"):  # other tools would unpickle a file so named
        assert main(["convert", str(lora_file), str(tmp_path / out), "--to", "diffusers"]) == 2
        assert "sdtune writes LoRAs as .safetensors files; use" in _error(capsys)
        assert main(["lora", "resize", str(lora_file), "--rank", "1", "--out", str(tmp_path / out)]) == 2
        assert "sdtune writes LoRAs as .safetensors files" in _error(capsys) and not (tmp_path / out).exists()
    # a folder that exists but cannot be written (root writes anywhere, so the check is made to fail)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(safeio.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    with pytest.raises(SdtuneError, match=r"ro: no permission to write in this folder; choose another place for --out"):
        output_folder(ro)
    with pytest.raises(SdtuneError, match="no permission to write"):
        output_folder(ro / "sub", create=False)


def test_settings_and_weights_that_cannot_work(tmp_path, lora_file, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    assert main(["train", "lora", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config",
                 str(folder)]) == 2
    assert "configs: is a folder, not a config file; give the .toml file" in _error(capsys)
    assert main(["train", "lora", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--lr", "inf"]) == 2
    assert "--lr: lr = inf is not a finite number" in _error(capsys)
    images = tmp_path / "images"  # a run folder in the data: its samples would become training images
    images.mkdir()
    (images / "a.txt").write_text("a caption")
    for out, where in ((images, "is --data"), (images / "run", "is inside --data")):
        assert main(["train", "lora", "--data", str(images), "--out", str(out), "--no-resume", "--steps", "1"]) == 2
        assert f"{out} {where} {images}: the run's sample images would be read as training images; give an " \
               f"--out outside it" in _error(capsys)
    assert [p.name for p in images.iterdir()] == ["a.txt"]
    assert main(["lora", "merge", f"{lora_file}:nan", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "must be a finite number" in _error(capsys) and not (tmp_path / "m.safetensors").exists()
    assert main(["lora", "resize", str(lora_file), "--dynamic", "sv_fro", "--param", "nan",
                 "--out", str(tmp_path / "r.safetensors")]) == 2
    assert "--dynamic takes one of" in _error(capsys)
    assert main(["generate", "--prompt", "x", "--lora-dir", str(tmp_path / "nodir"), "--steps", "1",
                 "--out", str(tmp_path / "g")]) == 2
    assert "nodir: --lora-dir is not a folder" in _error(capsys)


def test_a_merged_model_folder_is_readable_by_others(tmp_path, lora_file):
    """safetensors writes 0600 files; a merged diffusers folder's files get the umask's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    assert main(["merge", "--model", "tiny-random", "--lora", f"{lora_file}:0.5", "--out", str(tmp_path / "m")]) == 0
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}


def test_an_embedding_given_as_a_lora_is_refused_as_one(tmp_path, capsys):
    """A diffusers TI file ({token: vectors}) read like cloneofsimo's bundled embeddings, with no LoRA weights: it
    loaded as a LoRA that changed nothing, and the PNG credited it as one."""
    from safetensors.torch import save_file

    emb = tmp_path / "tri.safetensors"
    save_file({"<tri>": torch.randn(1, 64)}, str(emb))
    assert main(["generate", "--prompt", "x", "--steps", "1", "--no-progress", "--out", str(tmp_path / "g"),
                 "--lora", f"{emb}:0.8"]) == 2
    assert capsys.readouterr().err == (f"sdtune: error: {emb}: holds Textual Inversion embeddings (<tri>) and no "
                                       f"LoRA weights; load it as an embedding\n")
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


def test_a_lora_holding_nan_is_refused_by_every_command(tmp_path, lora_file, capsys):
    """It drew black images, a merge or bake carried it on, and resize failed inside the SVD with a traceback."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(lora_file))
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][0, 0] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(sd, str(nan))
    said = f"{nan}: 1 of its tensors hold NaN or infinite values (e.g. {key}); the file is broken: re-train or " \
           f"re-download it"
    for args in (["inspect", str(nan)], ["lora", "resize", str(nan), "--rank", "1", "--out", str(tmp_path / "r.safetensors")],
                 ["lora", "merge", str(nan), str(lora_file), "--out", str(tmp_path / "m.safetensors")],
                 ["merge", "--model", "tiny-random", "--lora", str(nan), "--out", str(tmp_path / "b")],
                 ["generate", "--model", "tiny-random", "--lora", str(nan), "--prompt", "a", "--steps", "1",
                  "--out", str(tmp_path / "g")]):
        assert main(args) == 2, args
        assert _error(capsys) == f"sdtune: error: {said}\n"
    # generate makes its (empty) output folder first, so that a place it cannot write is said before the work
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["g", "nan.safetensors"]


def test_training_numbers_no_machine_can_run_are_refused_before_the_work(tmp_path, capsys):
    """--batch-size 100000 on 4 images was killed by the kernel at 24 GB, --resolution 100000 ran out of memory
    in PIL, and --num-vectors 100 failed with a traceback after the first validation, its --out half written."""
    from sdtune.tiny import world

    data = world.write_dataset(tmp_path / "data", world.concept_scenes(4, seed=3, shape="star"))
    common = ["--data", str(data), "--model", "tiny-random", "--steps", "1", "--no-progress", "--no-report"]
    for kind, args, said in (
        ("lora", ["--batch-size", "100000"], f"--batch-size 100000: far more than the 3 training image(s) of {data}, "
                                             f"which each batch would repeat; use at most 3"),  # one held out
        ("lora", ["--resolution", "100000"], "--resolution 100000: at most 8192 pixels"),
        ("lora", ["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU; on the CPU use no or bf16"),
        ("ti", ["--token", "<x>", "--init-token", "star", "--dtype", "fp16"], "training on the CPU needs the model in "
                                                                            "fp32 (or bf16)"),
        ("lora", ["--reg-dir", str(tmp_path / "nothere")], f"{tmp_path / 'nothere'}: no such class-image folder; "
                                                            f"check --reg-dir"),
        ("lora", ["--bucket-step", "7"], "--bucket-step 7: the training size 64 must be a multiple of it; use a "
                                         "divisor of it such as"),
        ("ti", ["--token", "<x>", "--init-token", "star", "--num-vectors", "100"],
         "--num-vectors 100: must be from 1 to 75 (a prompt chunk's tokens)"),
    ):
        out = tmp_path / f"out-{kind}"
        assert main(["train", kind, *common, "--out", str(out), *args]) == 2
        err = _error(capsys)
        assert said in err and "encoding" not in err  # before any image is encoded
        assert not out.exists() or not any(out.iterdir())
    # a loaded embedding longer than a chunk is refused by name, not a traceback in the prompt's tokenizing
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(100, 64)}, str(tmp_path / "long.safetensors"))
    assert main(["generate", "--model", "tiny-random", "--embedding", str(tmp_path / "long.safetensors"),
                 "--prompt", "a long", "--steps", "1", "--out", str(tmp_path / "g")]) == 2
    assert "long.safetensors: 100 vectors; a prompt chunk holds 75 tokens" in _error(capsys)


def test_flags_that_would_do_nothing_are_said(tmp_path, lora_file, capsys):
    """--param without --dynamic was ignored; --max-upload-mb -5 started the server; --width -64 suggested 8;
    --debug after the command was an unknown argument."""
    assert main(["lora", "resize", str(lora_file), "--rank", "1", "--param", "0.5",
                 "--out", str(tmp_path / "r.safetensors")]) == 2
    assert "--param 0.5 is the target of a --dynamic mode; add --dynamic" in _error(capsys)
    assert main(["ui", "--max-upload-mb", "-5", "--out", str(tmp_path / "ui")]) == 2
    assert "--max-upload-mb -5.0: must be a size in MB greater than 0" in _error(capsys)
    assert main(["ui", "--lora-dir", str(lora_file), "--out", str(tmp_path / "ui")]) == 2
    assert f"--lora-dir {lora_file}: is a file, not a folder" in _error(capsys)
    assert main(["generate", "--model", "tiny-random", "--prompt", "a", "--width", "-64",
                 "--out", str(tmp_path / "g")]) == 2
    assert "width -64 is not a positive multiple of 8; leave it out (or 0) for the model's size" in _error(capsys)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert main(["inspect", str(tmp_path / "empty.safetensors")]) == 2
    assert _error(capsys) == f"sdtune: error: {tmp_path / 'empty.safetensors'}: an empty file (0 bytes); re-download " \
                             f"or re-export it\n"
    (tmp_path / "empty.safetensors").unlink()
    assert main(["eval-tiny", "--model", "tiny-random", "--images", "0"]) == 2
    assert "--images 0: must be at least 1" in _error(capsys)
    assert main(["convert", str(lora_file), str(tmp_path), "--to", "kohya"]) == 2  # its output is no --out
    assert f"{tmp_path}: is a folder; give a file name for the output (convert's OUT, or --out)" in _error(capsys)
    (tmp_path / "a-file").write_text("")
    assert main(["convert", str(lora_file), str(tmp_path / "a-file" / "x.safetensors"), "--to", "kohya"]) == 2
    assert _error(capsys) == (f"sdtune: error: {tmp_path / 'a-file'}: is a file, not a folder; choose another place "
                              f"for the output (convert's OUT, or --out)\n")
    (tmp_path / "a-file").unlink()
    with pytest.raises(SdtuneError, match="no such file"):  # --debug after the command: the traceback's error
        main(["inspect", str(tmp_path / "nothing.safetensors"), "--debug"])
    assert not (tmp_path / "r.safetensors").exists()


def test_a_text_encoder_learning_rate_for_a_unet_only_run_is_said(tmp_path):
    from sdtune.models import load_base
    from sdtune.tiny import world
    from sdtune.train.config import LoraSettings
    from sdtune.train.lora import train_lora

    data = world.write_dataset(tmp_path / "data", world.concept_scenes(4, seed=3, shape="star"))
    s = LoraSettings(data=str(data), out=str(tmp_path / "o"), steps=1, te_lr=1e-4, report=False, progress=False,
                     validation_split=0.0)
    with pytest.warns(UserWarning, match=r"--te-lr: for the text encoders, but this run trains the UNet only \(add "
                                         r"--text-encoder to train them too\); not used"):
        train_lora(load_base("tiny-random"), s)
    s = LoraSettings(data=str(data), out=str(tmp_path / "o2"), steps=1, te2_lr=1e-4, text_encoder=True,
                     report=False, progress=False, validation_split=0.0)
    with pytest.warns(UserWarning, match=r"--te2-lr: SDXL's second text encoder's learning rate, but the built-in "
                                         r"tiny model has one text encoder; not used"):
        train_lora(load_base("tiny-random"), s)


def test_a_refused_resume_is_said_before_the_images_are_encoded(tmp_path, capsys, monkeypatch):
    from sdtune.tiny import world
    from sdtune.train import lora as train_lora_module

    data = world.write_dataset(tmp_path / "data", world.concept_scenes(4, seed=3, shape="star"))
    args = ["train", "lora", "--data", str(data), "--model", "tiny-random", "--steps", "1", "--no-progress",
            "--sample-every", "0", "--no-report", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    capsys.readouterr()

    def encoded(*a, **k):
        raise AssertionError("the images were encoded before the resume was refused")
    monkeypatch.setattr(train_lora_module, "training_set", encoded)
    assert main([*args, "--lr", "0.5"]) == 2
    assert "this run was started with other settings (lr" in _error(capsys)


def test_a_resize_that_lowers_nothing_says_so(tmp_path, lora_file):
    with pytest.warns(UserWarning, match=r"style\.safetensors: --rank 4 is not below its rank \(2\); every layer is "
                                         r"written as it was"):
        assert main(["lora", "resize", str(lora_file), "--rank", "4", "--out", str(tmp_path / "r.safetensors")]) == 0
    # as it says: each layer's own tensors, bit for bit, not an SVD's factors of the same change
    with safe_open(lora_file, "pt") as f, safe_open(tmp_path / "r.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for key in f.keys():
            assert f.get_tensor(key).dtype == g.get_tensor(key).dtype
            assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key


def test_a_port_in_use_is_one_line_without_gradio_s_advice(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cwd = os.getcwd()
        assert main(["ui", "--model", "tiny-random", "--out", str(tmp_path / "ui"), "--port", str(port)]) == 2
        # the server changes into its output folder: one that does not start gives the folder back
        assert os.getcwd() == cwd
    err = _error(capsys)
    assert f"cannot serve on 127.0.0.1:{port} (" in err and "is another server using it? pass --port" in err
    assert "GRADIO_SERVER_PORT" not in err and "launch()" not in err


NOBODY = 65534  # Debian's user without a home or any group


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root, to run the commands as a user without write permission (setpriv)")
def test_folders_the_user_may_not_write_to_are_refused_in_one_line(lora_file):
    """As a user who may not write there (the tests run as root, who may write anywhere): every command that writes
    refuses the folder before any work, in one line naming it and its option, and leaves nothing in it."""
    top = Path(tempfile.mkdtemp(prefix="sdtune-ro-"))
    try:
        top.chmod(0o755)
        home, locked, data = top / "home", top / "locked", top / "data"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)  # caches (matplotlib's, the hub's) go somewhere writable, as on a real account
        locked.mkdir(mode=0o555)
        data.mkdir()
        shutil.copy(lora_file, top / "style.safetensors")
        (top / "style.safetensors").chmod(0o644)

        def run(*args):
            return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                   sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=top,
                                  env={**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"})
        probe = f"import sdtune; open({str(top / 'style.safetensors')!r}, 'rb').close()"
        if run("-c", probe).returncode != 0:  # a checkout, venv or temporary folder under a private home
            pytest.skip("the checkout, its virtual environment or the temporary folder is not readable by another user")
        tiny = ("--model", "tiny-random")
        cases = [
            (("generate", *tiny, "--prompt", "a star", "--steps", "1", "--out", locked / "gen"),
             f"{locked / 'gen'}: no permission to create this folder; choose another place for --out"),
            (("generate", *tiny, "--prompt", "a star", "--steps", "1", "--out", locked),
             f"{locked}: no permission to write in this folder; choose another place for --out"),
            (("train", "lora", *tiny, "--data", data, "--steps", "1", "--out", locked / "run"),
             f"{locked}: no permission to write in this folder; choose another place for --out"),
            (("merge", *tiny, "--lora", "style.safetensors", "--out", locked / "m.safetensors"),
             f"{locked}: no permission to write in this folder; choose another place for --out"),
            (("lora", "resize", "style.safetensors", "--rank", "1", "--out", locked / "r.safetensors"),
             f"{locked}: no permission to write in this folder; choose another place for --out"),
            (("convert", "style.safetensors", locked / "c.safetensors", "--to", "kohya"),
             f"{locked}: no permission to write in this folder; choose another place for the output (convert's OUT, "
             f"or --out)"),
        ]
        for args, says in cases:
            done = run("-m", "sdtune.cli", *map(str, args))
            assert (done.returncode, done.stderr) == (2, f"sdtune: error: {says}\n"), args
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(top)
