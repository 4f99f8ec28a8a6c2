"""Atomic writes: what a killed write leaves is cleared by the next write of that file, and a failed write (a full
disk) is one line naming the output."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdtune import safeio
from sdtune.safeio import SdtuneError


def dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_killed_writes_leftovers_are_cleared_by_the_next_write(tmp_path):
    target = tmp_path / "lora.safetensors"
    gone, alive = dead_pid(), os.getppid()
    stale = tmp_path / f".lora.safetensors.{gone}-abc.tmp"  # a killed write's folder, with what it held
    stale.mkdir()
    (stale / "lora.safetensors").write_bytes(b"x" * 1000)
    (stale / ".tmpQ1w2e3").write_bytes(b"y" * 1000)  # safetensors' own temporary inside it
    running = tmp_path / f".lora.safetensors.{alive}-def.tmp"  # another process writing it now: left alone
    running.mkdir()
    other = tmp_path / f".other.safetensors.{gone}-abc.tmp"  # another file's: left for that file's next write
    other.mkdir()
    safeio.atomic_save_safetensors({"a": torch.ones(3)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, running.name, other.name])
    # the write itself leaves nothing beside the file (safetensors' own temporary stays in sdtune's folder)
    running.rmdir(), other.rmdir()
    safeio.atomic_save_safetensors({"a": torch.zeros(3)}, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_folder_set_aside_by_a_kill_between_two_renames_is_put_back(tmp_path):
    model = tmp_path / "merged"
    aside = tmp_path / f".merged.{dead_pid()}-xyz.old"
    (aside / "merged" / "unet").mkdir(parents=True)
    (aside / "merged" / "model_index.json").write_text("{}")
    safeio.clear_stale(model)
    assert (model / "model_index.json").read_text() == "{}" and (model / "unet").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_full_disk_is_one_line_naming_the_output(tmp_path, monkeypatch):
    def full(*args, **kwargs):  # what torch's zip writer raises when the disk fills (not an OSError)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1535424 vs 1535312")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SdtuneError, match=r"resume.pt: could not be written \(\[enforce fail .* unexpected pos 1535424 vs 1535312\); "
                                          r"free some space or choose another place$"):
        safeio.atomic_save_torch({"a": 1}, tmp_path / "resume.pt")
    with pytest.raises(SdtuneError, match=r"model: could not be written \(.*No space left.*\); free some space"):
        with safeio.atomic_folder(tmp_path / "model"):  # save_pretrained's safetensors error
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(SdtuneError, match=r"model: could not be written \(No space left on device \(os error 28\)\); "
                                          r"free some space"):
        with safeio.atomic_folder(tmp_path / "model"):  # the tokenizers library's: a bare Exception
            raise Exception("No space left on device (os error 28)")
    with pytest.raises(Exception, match="^a defect$"):  # other errors go up as they are
        with safeio.atomic_folder(tmp_path / "model"):
            raise Exception("a defect")
    assert list(tmp_path.iterdir()) == []


def test_an_error_naming_a_temporary_names_the_output():
    assert safeio.user_path("/x/.lora.safetensors.123-ab_c9.tmp/lora.safetensors") == safeio.Path("/x/lora.safetensors")
    assert safeio.user_path(b"/x/.lora.safetensors.123-abc.tmp") == safeio.Path("/x/lora.safetensors")
    assert safeio.user_path("/x/out/lora.safetensors") == safeio.Path("/x/out/lora.safetensors")


def test_a_torch_file_named_safetensors_is_read_by_its_content(tmp_path):
    """torch picks its reader by a path's suffix: a torch file named .safetensors gave "header too large"."""
    path = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.arange(3.0)}, path)
    state, metadata = safeio.load_state(path)
    assert torch.equal(state["w"], torch.arange(3.0)) and metadata == {}


def test_sigterm_mid_write_removes_the_temporary_and_says_so(tmp_path, monkeypatch, capsys):
    """`kill`, `docker stop` or a job scheduler's time limit (SIGTERM) while a command writes: the half-written
    temporary goes as after Ctrl-C, the old output stays, and the command says why it stopped (rc 128 + 15)."""
    import signal

    from sdtune import cli, commands

    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"the earlier merge")

    def killed_midway(args):
        with safeio.atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("SIGTERM did not stop the command")

    monkeypatch.setattr(commands, "cmd_merge", killed_midway)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["merge", "--lora", "x.safetensors", "--out", str(out)]) == 143
    assert capsys.readouterr().err == "sdtune: terminated (SIGTERM)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]
    assert out.read_bytes() == b"the earlier merge" and signal.getsignal(signal.SIGTERM) is before


def test_a_torch_file_cut_short_is_said_in_plain_words(tmp_path):
    path = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.randn(4, 64)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(SdtuneError, match=r"^.*embedding.pt: a torch file cut short \(its zip archive has no end\); "
                                          r"re-download or re-export it$"):
        safeio.load_state(path)


def in_mapping_of(tensor: torch.Tensor, path) -> bool:
    """Whether the tensor's memory lies in a mapping of the file (Linux's /proc/self/maps)."""
    for line in open("/proc/self/maps").read().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= tensor.data_ptr() < end:
                return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_safetensors_are_read_into_own_aligned_memory_not_a_mapping_of_the_file(tmp_path):
    """A checkpoint copied out of safe_open's file mapping (a cast, a realignment) was held twice at the peak (8.7 GB
    RSS for a 4.3 GB SD 1.5 file): each tensor is now read into its own memory, bit-equal to safe_open's."""
    tensors = {"a": torch.randn(3, 5), "h": torch.randn(7).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(5), "flag": torch.ones(0), "s": torch.tensor(2.5), "m": torch.tensor([True, False])}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    state, metadata = safeio.load_state(path)
    assert metadata == {"k": "v"} and state.keys() == tensors.keys()
    with safe_open(str(path), "pt") as f:
        for key, value in state.items():
            want = f.get_tensor(key)
            assert value.dtype == want.dtype and value.shape == want.shape and torch.equal(value, want), key
            assert not in_mapping_of(value, path), key
            assert value.numel() == 0 or value.data_ptr() % 64 == 0, key
    # mmap: views of the file, read when used (models copy them straight to a GPU that way)
    mapped, _ = safeio.load_state(path, mmap=True)
    assert torch.equal(mapped["a"], tensors["a"]) and in_mapping_of(mapped["a"], path)
    # a dtype sdtune does not read itself (fp8) still loads, through safe_open
    save_file({"e": torch.randn(4).to(torch.float8_e4m3fn), "a": tensors["a"]}, path)
    state, _ = safeio.load_state(path)
    assert state["e"].dtype == torch.float8_e4m3fn and torch.equal(state["a"], tensors["a"])
    # a file cut short is refused by the header check before any read
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(SdtuneError, match="not a readable safetensors file"):
        safeio.load_state(path)
