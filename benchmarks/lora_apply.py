"""LoRA apply / reweight / restore / bake: sdtune against diffusers on the real SD 1.5 and SDXL architectures (CPU).

Two kohya LoRAs of rank 32 (random values) on every attention, feed-forward and text-encoder linear layer of
a random-init model (``load_base("sd15-random")``; the SDXL row: ``--model sdxl-random --dtype fp16``, both
text encoders, ``lora_te1_``/``lora_te2_`` names), timed in the same run:

- diffusers: ``load_lora_weights`` x2; ``set_adapters`` + ``fuse_lora``; ``unfuse_lora``; a reweight of the
  fused model (``unfuse_lora`` + ``set_adapters`` + ``fuse_lora``).
- sdtune: ``load_lora`` x2; ``LoraSet.add`` x2 in one batch; ``set_weights``; ``remove_all`` (checked bit-exact).
- a single-file bake (``bake.merge(..., fmt="single")``) in a subprocess, whose peak RSS is read back
  (``benchmarks/bake_sdxl.py`` measures the full-size SDXL bake against diffusers).

Heavy: ~7 GB of RAM and a few minutes for SD 1.5; SDXL in fp16 ~12 GB. Run it alone, e.g.
``nice python benchmarks/lora_apply.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune import ldm
from sdtune.lora.formats import load_lora
from sdtune.lora.patch import LoraSet
from sdtune.models import META_ARCH, load_base
from sdtune.safeio import SdtuneError

UNET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def components(base) -> list[str]:
    return ["unet", *(te.component for te in base.family.text_encoders)]


def targets(base):
    for comp in components(base):
        suffixes = UNET_SUFFIXES if comp == "unet" else TE_SUFFIXES
        for path, m in getattr(base, comp).named_modules():
            if isinstance(m, torch.nn.Linear) and path.endswith(suffixes):
                yield comp, path, m


def kohya_name(base, comp: str, path: str) -> str:
    if comp == "unet":
        return "lora_unet_" + path.replace(".", "_")
    # kohya keeps transformers 4's text_model level: lora_te_text_model_encoder_..., lora_te2_text_model_...
    return base.family.text_encoder(comp).kohya_prefix + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")


def write_kohya(base, path: Path, seed: int, rank: int, alpha: float) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, p, m in targets(base):
        name = kohya_name(base, comp, p)
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.02).to(base.dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.02).to(base.dtype)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                                       "ss_base_model_version": base.family.base_model_version})


def write_ldm_file(base, path: Path) -> None:
    """The base as a single file in its family's layout, written tensor by tensor (the benchmark must not need
    2x the model)."""
    state = ldm.to_single_file(base.modules(), base.family)
    header, offset = {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": ST_NAMES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps({"__metadata__": {META_ARCH: base.family.name}, **header}).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for v in state.values():
            f.write(memoryview(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def digest(base, keys) -> str:
    h = hashlib.sha256()
    for comp, p in sorted(keys):
        h.update(getattr(base, comp).get_submodule(p).weight.detach().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def sdtune_round(base, files, probes) -> tuple[dict, dict, float]:
    r = {}
    s = LoraSet.attach(base)
    r["load"], (a, b) = timed(lambda: (load_lora(files[0], model_keys=s.modules),
                                       load_lora(files[1], model_keys=s.modules)))

    def apply():
        with s.batch():
            s.add("a", a, 0.5)
            s.add("b", b, 1.0)
    r["apply"], _ = timed(apply)
    patched = {k: getattr(base, k[0]).get_submodule(k[1]).weight.detach().clone() for k in probes}
    pristine_gb = s.pristine_bytes() / 1e9
    r["reweight"], _ = timed(lambda: s.set_weights({"a": 0.8, "b": 0.3}))
    r["reweight_one"], _ = timed(lambda: s.set_weights({"b": 0.6}))
    r["restore"], _ = timed(s.remove_all)
    s.detach()
    return r, patched, pristine_gb


def run_sdtune(base, files, probes, repeats):
    """Each step ``repeats`` times (fresh adapters each round); returns the median seconds per step."""
    rounds, exact = [], True
    before = digest(base, [(c, p) for c, p, _ in targets(base)])
    for _ in range(repeats):
        r, patched, pristine_gb = sdtune_round(base, files, probes)
        exact &= digest(base, [(c, p) for c, p, _ in targets(base)]) == before
        rounds.append(r)
        print(f"  sdtune round: { {k: round(v, 3) for k, v in r.items()} }", flush=True)
    median = {k: sorted(r[k] for r in rounds)[len(rounds) // 2] for k in rounds[0]}
    return {**median, "pristine_gb": pristine_gb, "exact_restore": exact}, patched


def run_diffusers(base, files, probes):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    r = {}
    pipe = base.pipeline()
    r["load"], _ = timed(lambda: (pipe.load_lora_weights(str(files[0]), adapter_name="a"),
                                  pipe.load_lora_weights(str(files[1]), adapter_name="b")))

    parts = components(base)

    def fuse(weights):
        pipe.set_adapters(["a", "b"], adapter_weights=weights)
        pipe.fuse_lora(components=parts, lora_scale=1.0, adapter_names=["a", "b"])
    r["apply"], _ = timed(lambda: fuse([0.5, 1.0]))
    fused = {k: getattr(base, k[0]).get_submodule(k[1]).base_layer.weight.detach().clone() for k in probes}
    r["restore"], _ = timed(lambda: pipe.unfuse_lora(components=parts))
    fuse([0.5, 1.0])
    t_unfuse, _ = timed(lambda: pipe.unfuse_lora(components=parts))
    t_fuse, _ = timed(lambda: fuse([0.8, 0.3]))
    r["reweight_fuse_only"], r["reweight"] = t_fuse, t_unfuse + t_fuse
    pipe.unfuse_lora(components=parts)
    pipe.unload_lora_weights()
    return r, fused


# VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss across exec.
BAKE_CHILD = """
import re, sys, time
from sdtune.lora.bake import merge
t = time.perf_counter()
merge(sys.argv[1], [(sys.argv[2], 0.5), (sys.argv[3], 1.0)], sys.argv[4], fmt="single")
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print(time.perf_counter() - t, int(hwm) * 1024)
"""


def run_bake(base, files, tmp: Path, patched):
    src, out = tmp / "base.safetensors", tmp / "merged.safetensors"
    try:
        write_ldm_file(base, src)
    except SdtuneError as e:  # single files of this family are not written yet
        print(f"bake skipped: {e}", flush=True)
        return None
    proc = subprocess.run([sys.executable, "-c", BAKE_CHILD, str(src), str(files[0]), str(files[1]), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"bake failed:\n{proc.stderr[-3000:]}")
    seconds, rss = map(float, proc.stdout.split()[-2:])
    inverse = {d: m for m, d in ldm.unet_module_map(base.unet.config).items()}
    same = True
    with safe_open(str(out), framework="pt") as f:
        for (comp, p), w in patched.items():
            key = (f"{ldm.UNET_PREFIX}{inverse[p]}.weight" if comp == "unet" else f"{ldm.TEXT_PREFIX}{p}.weight")
            same &= torch.equal(f.get_tensor(key), w)
    return {"seconds": seconds, "peak_rss_gb": rss / 1e9, "file_gb": src.stat().st_size / 1e9,
            "equals_in_memory_patch": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15-random",
                    help="sd15-random (the benchmark), sdxl-random (the SDXL row, with --dtype fp16) or tiny-random "
                         "/ sdxl-small-random (smoke runs)")
    ap.add_argument("--dtype", default="fp32", help="fp32 (SD 1.5 row) or fp16 (SDXL row)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-bake", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="sdtune rounds (the median is reported)")
    args = ap.parse_args()

    t, base = timed(lambda: load_base(args.model, device="cpu", dtype=args.dtype))
    print(f"{args.model}: built in {t:.1f} s; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs",
          flush=True)
    by_component: dict[str, list[str]] = {}
    for comp, path, _ in targets(base):
        by_component.setdefault(comp, []).append(path)
    probes = [(c, paths[i]) for c, paths in by_component.items() for i in (0, -1)]  # first and last of each
    original = {k: getattr(base, k[0]).get_submodule(k[1]).weight.detach().clone() for k in probes}
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-", dir=os.environ.get("SDTUNE_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        files = (tmp / "a_kohya.safetensors", tmp / "b_kohya.safetensors")
        write_kohya(base, files[0], 1, args.rank, alpha=16.0)
        write_kohya(base, files[1], 2, args.rank, alpha=8.0)
        layers = sum(1 for _ in targets(base))
        print(f"two kohya LoRAs, rank {args.rank}, {layers} layers each, "
              f"{files[0].stat().st_size / 1e6:.0f} MB per file", flush=True)

        sd, patched = run_sdtune(base, files, probes, args.repeats)
        print(f"sdtune done: {sd}", flush=True)
        bake = None if args.no_bake else run_bake(base, files, tmp, patched)
        if bake:
            print(f"bake done: {bake}", flush=True)
        df, fused = (None, None) if args.no_diffusers else run_diffusers(base, files, probes)

    rows = [("load both files", "load_lora_weights x2", "load", "load"),
            ("apply both at [0.5, 1.0]", "set_adapters + fuse_lora", "apply", "apply"),
            ("load + apply (the issue's step)", "load + set_adapters + fuse", None, None),
            ("reweight to [0.8, 0.3]", "unfuse + set_adapters + fuse", "reweight", "reweight"),
            ("reweight (vs fuse part only)", "set_adapters + fuse_lora", "reweight", "reweight_fuse_only"),
            ("full restore", "unfuse_lora", "restore", "restore")]
    print("\n| step | diffusers: call | diffusers s | sdtune s | speed-up |\n|---|---|---|---|---|")
    for label, call, skey, dkey in rows:
        s = sd["load"] + sd["apply"] if skey is None else sd[skey]
        d = None if df is None else (df["load"] + df["apply"] if dkey is None else df[dkey])
        ratio = f"{d / s:.1f}x" if d else "-"
        print(f"| {label} | {call} | {d:.2f} | {s:.3f} | {ratio} |" if d else f"| {label} | {call} | - | {s:.3f} | - |")
    print(f"\nsdtune: median of {args.repeats} rounds; diffusers: one round (the issue measured 5.3 s load, "
          "13.4 s set_adapters + fuse, 11.0 s unfuse)")
    print(f"sdtune: one adapter reweighted {sd['reweight_one']:.3f} s; originals kept {sd['pristine_gb']:.2f} GB; "
          f"restore bit-exact: {sd['exact_restore']}")
    if fused is not None:
        rel = max(((patched[k].double() - fused[k].double()).norm()
                   / (fused[k].double() - original[k].double()).norm()).item() for k in probes)
        print(f"sdtune vs diffusers fused weights (probe layers): max relative error {rel:.1e} (of the weight change)")
    if bake:
        print(f"single-file bake ({bake['file_gb']:.2f} GB {args.dtype} LDM file): {bake['seconds']:.1f} s, peak RSS "
              f"{bake['peak_rss_gb']:.2f} GB (target < 1.5 GB); equals in-memory patch: {bake['equals_in_memory_patch']}")


if __name__ == "__main__":
    main()
