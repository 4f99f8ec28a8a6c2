"""A kohya sd-scripts config file (as kohya_ss writes it) given to `sdtune train lora --config`: read as sd-scripts
reads it (its names, values, network module and arguments, learning rates, text encoder on by default), its
switches of how sd-scripts runs left out in one line, what sdtune lacks refused while on; a run from it trains and
saves sdtune's settings, which rerun it."""

import json

import pytest
from safetensors import safe_open
from small_runs import outline_dataset

from sdtune import families
from sdtune.cli import main
from sdtune.families import kohya_clip_skip
from sdtune.safeio import SdtuneError
from sdtune.train import loop
from sdtune.train.config import load_settings

# a config_lora-*.toml as kohya_ss writes it for sd-scripts' train_network.py (its keys, its spelling)
KOHYA_SS = """bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
cache_latents_to_disk = false
caption_extension = ".txt"
clip_skip = 2
dynamo_backend = "no"
enable_bucket = true
epoch = 15
gradient_accumulation_steps = 1
gradient_checkpointing = true
huber_c = 0.1
huber_schedule = "snr"
learning_rate = 0.0004
logging_dir = "/workspace/kohya_ss/logs"
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_epochs = 15
max_train_steps = 1600
min_bucket_reso = 256
mixed_precision = "fp16"
multires_noise_discount = 0.3
network_alpha = 16
network_dim = 32
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_type = "AdamW8bit"
output_dir = "/workspace/out"
output_name = "mylora"
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
prior_loss_weight = 1
resolution = "512,512"
sample_prompts = "/workspace/prompt.txt"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
sdpa = true
text_encoder_lr = 0.0001
train_batch_size = 2
train_data_dir = "/workspace/img"
unet_lr = 0.0004
xformers = "sdpa"
seed = 42
full_fp16 = false
color_aug = false
"""


def test_a_kohya_ss_config_reads_as_sd_scripts_reads_it(tmp_path, recwarn):
    cfg = tmp_path / "config_lora.toml"
    cfg.write_text(KOHYA_SS)
    s = load_settings(cfg, {}, "lora", family="sd1")
    got = {k: getattr(s, k) for k in ("model", "data", "out", "name", "lr", "te_lr", "text_encoder", "unet", "rank",
                                       "alpha", "algo", "optimizer", "resolution", "steps", "epochs", "batch_size",
                                       "save_every_epochs", "save_precision", "sample_prompts", "sample_sampler",
                                       "buckets", "bucket_step", "bucket_no_upscale", "min_bucket_reso",
                                       "max_bucket_reso", "clip_skip", "seed", "mixed_precision", "lr_scheduler")}
    assert got == dict(model="runwayml/stable-diffusion-v1-5", data="/workspace/img", out="/workspace/out",
                       name="mylora", lr=4e-4, te_lr=1e-4, text_encoder=True, unet=True, rank=32, alpha=16.0,
                       algo="lora", optimizer="adamw8bit", resolution=512, steps=1600, epochs=15, batch_size=2,
                       save_every_epochs=1, save_precision="fp16", sample_prompts=["/workspace/prompt.txt"],
                       sample_sampler="euler_a", buckets=True, bucket_step=64, bucket_no_upscale=True,
                       min_bucket_reso=256, max_bucket_reso=2048, clip_skip=2, seed=42, mixed_precision="fp16",
                       lr_scheduler="cosine")
    [said] = {str(w.message) for w in recwarn if "sd-scripts" in str(w.message)}
    assert said == (f"{cfg}: read as a kohya sd-scripts config; cache_latents, dynamo_backend, logging_dir, "
                    f"max_data_loader_n_workers, noise_offset_type, save_model_as, sdpa, xformers change nothing "
                    f"sdtune trains and are not used")


@pytest.mark.parametrize("extra, want", [
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "conv_dim=4", "conv_alpha=1", "preset=attn-mlp"]',
     dict(algo="loha", conv_rank=4, conv_alpha=1.0, targets="attn+ff")),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=8", "rank_dropout=0.1"]',
     dict(algo="lokr", lokr_factor=8, rank_dropout=0.1)),
    # LyCORIS's diag-oft: its constraint (0 where not given) is the alpha; network_alpha goes unused
    ('network_module = "lycoris.kohya"\nnetwork_dim = 8\nnetwork_alpha = 4\nnetwork_args = ["algo=diag-oft", '
     '"constraint=0.5"]', dict(algo="oft", rank=8, alpha=0.5)),
    ('network_module = "lycoris.kohya"\nnetwork_dim = 8\nnetwork_alpha = 4\nnetwork_args = ["algo=diag-oft"]',
     dict(algo="oft", rank=8, alpha=0.0, oft_rescaled=False)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=ia3", "train_on_input=True"]',
     dict(algo="ia3", ia3_on_input=True)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=full", "preset=attn-mlp"]',
     dict(algo="full", targets="attn+ff")),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=diag-oft", "rescaled=True"]',
     dict(algo="oft", oft_rescaled=True, oft_butterfly=False)),
    ('network_module = "lycoris.kohya"\nnetwork_dim = 16\nnetwork_args = ["algo=boft", "constraint=0.1"]',
     dict(algo="oft", oft_butterfly=True, rank=16, alpha=0.1)),
    # kohya's own OFT: network_dim counts blocks, network_alpha is the constraint (sd-scripts' default 1), the UNet
    # alone; attention only unless enable_all_linear, the resnets and samplers with enable_conv
    ('network_module = "networks.oft"\nnetwork_dim = 8\nnetwork_alpha = 0.001',
     dict(algo="oft", oft_blocks=8, alpha=0.001, targets="attn", conv_rank=0, text_encoder=False)),
    ('network_module = "networks.oft"', dict(algo="oft", oft_blocks=4, alpha=1.0, text_encoder=False)),
    ('network_module = "networks.oft"\nnetwork_dim = 8\nnetwork_alpha = 0.01\nnetwork_train_unet_only = false\n'
     'network_args = ["enable_all_linear=True", "enable_conv=True"]',
     dict(oft_blocks=8, targets="attn+ff", conv_rank=8, conv_alpha=0.01, alpha=0.01, text_encoder=False)),
    ('network_module = "networks.oft"\nnetwork_args = ["enable_conv=True"]',
     dict(oft_blocks=4, targets="attn", conv_rank=4, conv_alpha=1.0)),
    ('network_module = "networks.lora"\nnetwork_args = ["dora_wd=True", "loraplus_lr_ratio=16"]',
     dict(algo="dora", loraplus_lr_ratio=16.0, dora_wd_on_output=False)),
    # LyCORIS's DoRA axis: per output row when asked (its recent default; sdtune's stays kohya's, per input column)
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "dora_wd=True", "wd_on_output=True"]',
     dict(algo="dora", dora_wd_on_output=True)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "dora_wd=True", "wd_on_out=False"]',
     dict(algo="dora", dora_wd_on_output=False)),
    # sd-scripts' LoRA+ ratios per component
    ('network_args = ["loraplus_unet_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"]',
     dict(loraplus_unet_lr_ratio=16.0, loraplus_te_lr_ratio=4.0, loraplus_lr_ratio=0.0)),
    # every switch read one way: True/False, or LyCORIS's 1/0
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "dora_wd=1", "rs_lora=0", "use_scalar=1"]',
     dict(algo="dora", rs_lora=False, scalar=True)),
    ('network_module = "networks.lora"\nnetwork_train_unet_only = true', dict(text_encoder=False, unet=True)),
    ("network_dim = 16", dict(rank=16, alpha=1.0, text_encoder=True)),  # sd-scripts' defaults the file relies on
    ('network_module = "networks.lora"\nnetwork_train_text_encoder_only = true', dict(text_encoder=True, unet=False)),
    # sd-scripts gives the text encoders learning_rate when unet_lr is the UNet's own and text_encoder_lr is absent
    ('network_module = "networks.lora"\nlearning_rate = 1e-4\nunet_lr = 3e-4', dict(lr=3e-4, te_lr=1e-4)),
    ('network_module = "networks.lora"\nlearning_rate = 1e-4\ntext_encoder_lr = [5e-5, 2e-5]',
     dict(lr=1e-4, te_lr=5e-5, te2_lr=2e-5)),
    ('network_module = "networks.lora"\nrandom_crop = true\nresolution = 768', dict(crop="random", resolution=768)),
    ("save_every_n_epochs = 2\nsave_last_n_epochs = 3", dict(save_every_epochs=2, keep_last=3)),
    ("alpha_mask = true", dict(masked_loss=True)),
    # sd-scripts' validation keys (validation_split's siblings); its switches of what sdtune lacks, while off
    ("validate_every_n_steps = 5\nvalidate_every_n_epochs = 1\nmax_validation_steps = 4", dict(validation_every=5)),
    ("initial_step = 0\nskip_until_initial_step = false\nno_metadata = false\nhuber_scale = 1.0\n"
     'resize_interpolation = ""\nconditioning_data_dir = ""\ntorch_compile = true', dict(validation_every=0)),
    ("stop_text_encoder_training = 300", dict(te_steps=300)),
    ("token_warmup_min = 3\ntoken_warmup_step = 0.25", dict(token_warmup_min=3, token_warmup_ratio=0.25)),
    ("token_warmup_step = 10", dict(token_warmup_steps=10, token_warmup_ratio=0.0)),
    ('network_weights = "a.safetensors"\ndim_from_weights = true', dict(network_weights="a.safetensors")),
    ("max_train_epochs = 10\nsave_n_epoch_ratio = 3", dict(epochs=10, save_every_epochs=3)),
    ("max_train_epochs = 2\nsave_n_epoch_ratio = 3", dict(epochs=2, save_every_epochs=1)),
    ("full_bf16 = true", dict(full_bf16=True)), ("color_aug = true", dict(color_aug=True)),
    ('caption_separator = ","', dict(shuffle_captions=False)), ("fp8_base = true", dict(fp8_base=True)),
    ("fp8_base_unet = true", dict(fp8_base_unet=True)),
    ('optimizer_type = "RAdamScheduleFree"\nlr_scheduler = "constant"', dict(optimizer="radamschedulefree")),
    # a scheduler class: sd-scripts leaves lr_scheduler aside; kohya_ss writes the arguments as one string
    ('lr_scheduler = "cosine"\nlr_scheduler_type = "CosineAnnealingLR"\nlr_scheduler_args = ["T_max=100"]',
     dict(lr_scheduler="CosineAnnealingLR", lr_scheduler_args=["T_max=100"])),
    ('lr_scheduler_type = "torch.optim.lr_scheduler.StepLR"\nlr_scheduler_args = "step_size=10 gamma=0.5"',
     dict(lr_scheduler="torch.optim.lr_scheduler.StepLR", lr_scheduler_args=["step_size=10", "gamma=0.5"])),
    ('lr_scheduler = "linear"\nlr_scheduler_type = ""\nlr_scheduler_args = ""',
     dict(lr_scheduler="linear", lr_scheduler_args=[])),
    ('optimizer_type = "torch.optim.RAdam"', dict(optimizer="torch.optim.RAdam")),  # any class, as sd-scripts
    # D-Adaptation as kohya names it (DAdaptation: the preprint's Adam); its rates are factors, 1.0 unless given
    ('optimizer_type = "DAdaptAdam"', dict(optimizer="dadaptadam", lr=1.0)),
    ('optimizer_type = "DAdaptation"\nlearning_rate = 0.5', dict(optimizer="dadaptation", lr=0.5)),
    # sd-scripts gives the weight decay among the optimizer's arguments (a list, or kohya_ss's one string)
    ('optimizer_type = "AdamW8bit"\noptimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]',
     dict(optimizer="adamw8bit", weight_decay=0.1, optimizer_args=["betas=0.9,0.99"])),
    ('optimizer_type = "Prodigy"\noptimizer_args = "weight_decay=0.05 d_coef=2"',
     dict(optimizer="prodigy", weight_decay=0.05, optimizer_args=["d_coef=2"])),
    ('lr_scheduler = "warmup_stable_decay"\nlr_decay_steps = 0.2\nlr_scheduler_min_lr_ratio = 0.1',
     dict(lr_scheduler="warmup_stable_decay", lr_decay_ratio=0.2, lr_decay_steps=0, lr_scheduler_min_lr_ratio=0.1)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lora", "rs_lora=True"]', dict(rs_lora=True)),  # (train_db.py's; kohya_ss writes it for LoRA too)
    ("lr_warmup_steps = 0.1", dict(lr_warmup_ratio=0.1, lr_warmup_steps=0)),  # sd-scripts: below 1, a share
    ("lr_warmup_steps = 10.0", dict(lr_warmup_ratio=0.0, lr_warmup_steps=10)),  # (a whole float: its steps)
    # kohya_ss's LoHa: each LyCORIS switch written, False; its arguments also as one command-line string
    ('network_module = "lycoris.kohya"\nnetwork_args = ["preset=full", "conv_dim=4", "conv_alpha=1", "rank_dropout=0", '
     '"module_dropout=0", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False", "algo=loha", '
     '"train_norm=False"]', dict(algo="loha", conv_rank=4, targets="all")),
    ('network_module = "lycoris.kohya"\nnetwork_args = \'"algo=lokr" "factor=4" "use_cp=False" "decompose_both=False"\'',
     dict(algo="lokr", lokr_factor=4)),
    # LyCORIS's LoKr options; rank_dropout_scale=True is what sdtune does; other algorithms pass LoKr's by
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "full_matrix=True", "decompose_both=False", '
     '"unbalanced_factorization=True", "rank_dropout_scale=True", "rank_dropout=0.1"]',
     dict(algo="lokr", lokr_full_matrix=True, lokr_decompose_both=False, lokr_unbalanced=True, rank_dropout=0.1)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "decompose_both=True"]',
     dict(algo="lokr", lokr_full_matrix=False, lokr_decompose_both=True)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "full_matrix=True", "bypass_mode=True"]',
     dict(algo="loha", lokr_full_matrix=False)),  # (bypass_mode: how LyCORIS computes the same change)
    # LyCORIS's Tucker and scalar switches (use_cp: use_tucker's older name), for LoCon, LoHa and LoKr
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "conv_dim=4", "use_tucker=True", '
     '"use_scalar=True"]', dict(algo="lora", tucker=True, scalar=True)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "conv_dim=4", "use_cp=True"]',
     dict(algo="lokr", tucker=True, scalar=False)),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=loha", "train_norm=True"]',
     dict(algo="loha", train_norm=True)),
    # sd-scripts deletes the save 200 steps back: saves at 300, 400 and 500 are kept at step 500
    ("save_every_n_steps = 100\nsave_last_n_steps = 200\nsave_last_n_steps_state = 200",
     dict(save_every=100, keep_last=3)),
])
def test_network_modules_arguments_and_rates(tmp_path, extra, want):
    cfg = tmp_path / "c.toml"
    cfg.write_text('pretrained_model_name_or_path = "m"\n' + extra + "\n")
    s = load_settings(cfg, {}, "lora", family="sd1")
    assert {k: getattr(s, k) for k in want} == want


@pytest.mark.parametrize("extra, says", [
    ("fused_backward_pass = true\nface_crop_aug_range = \"2.0,4.0\"", r"sdtune does not offer fused_backward_pass = "
                                                                   r"True, face_crop_aug_range = '2.0,4.0'; leave them out"),
    ("full_fp16 = true", r'full_fp16 = true needs mixed_precision = "fp16", as sd-scripts requires'),
    ("initial_step = 100\nhuber_scale = 2.0\nno_metadata = true",
     r"sdtune does not offer initial_step = 100, huber_scale = 2.0, no_metadata = True; leave them out"),
    ("stop_text_encoder_training = -1", r"stop_text_encoder_training = -1 \(network_train_unet_only = true trains "
                                        r"the UNet alone\)"),
    ('network_module = "networks.dylora"', r"network_module = 'networks.dylora': sdtune trains networks.lora, "
                                           r"networks.oft and lycoris.kohya"),
    ('network_module = "networks.oft"\nnetwork_train_text_encoder_only = true',
     r"network_train_text_encoder_only with networks.oft: kohya's OFT trains the UNet alone"),
    ('network_module = "networks.oft"\nnetwork_args = ["constraint=0.1"]',
     r"network_args constraint=0.1: not an argument sdtune reads"),
    ('network_args = ["block_size=4"]', r"network_args block_size=4: not an argument sdtune reads"),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=glora"]', r"algo = 'glora': sdtune trains LyCORIS's"),
    ('resolution = "768,512"', r"resolution = '768,512': sdtune trains at a square size .* resolution = 576"),
    ('optimizer_type = "CAME"', r"optimizer_type = 'CAME': sdtune trains with adamw, adamw8bit"),
    ('optimizer_args = ["weight_decay=lots"]', r"optimizer_args 'weight_decay=lots': weight_decay takes a number"),
    ('caption_extension = ".cap"', r"caption_extension = '.cap': sdtune reads captions from .txt and .caption"),
    ("save_n_epoch_ratio = 3", r"save_n_epoch_ratio = 3 spreads saves over max_train_epochs, which it does not "
                               r"give; give save_every_n_epochs instead"),
    ('caption_separator = ";"', r"caption_separator = ';': sdtune splits captions into tags at commas"),
    ('in_json = "meta_lat.json"', r"in_json = 'meta_lat.json': sdtune reads sd-scripts' fine-tuning metadata from a "
                                  r"dataset config; give dataset_config = a .toml with \[\[datasets.subsets\]\] "
                                  r"image_dir = train_data_dir's folder and metadata_file = 'meta_lat.json'"),
    ("learning_rate = 1e-4\nlr = 2e-4", r"lr = 0.0002 and another key set lr to 0.0001; keep one"),
    ("gradient_accumulation_step = 2", r"unknown setting for lora training: 'gradient_accumulation_step'"),
    ('resume = "/runs/last-state"', r"resume = '/runs/last-state': sd-scripts' saved state \(accelerate's\) is not one "
                                    r"sdtune reads; continue from its last LoRA with network_weights"),
])
def test_what_sdtune_cannot_do_as_the_file_says_is_one_line(tmp_path, extra, says):
    cfg = tmp_path / "c.toml"
    cfg.write_text('pretrained_model_name_or_path = "m"\n' + extra + "\n")
    with pytest.raises(SdtuneError, match=says):
        load_settings(cfg, {}, "lora", family="sd1")


def test_print_settings_shows_what_a_run_would_use_and_reads_back(tmp_path, capsys):
    """--print-settings: the settings after the model's preset, the file and the flags, as the TOML --config reads
    (equal settings read back), without loading the model or training; a bad value is the run's one line."""
    cfg = tmp_path / "config_lora.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "tiny"\nnetwork_dim = 16\nnetwork_alpha = 8\n'
                   f'train_data_dir = "{tmp_path / "data"}"\noutput_dir = "{tmp_path / "out"}"\nmax_train_steps = 50\n')
    assert main(["train", "lora", "--config", str(cfg), "--lr", "3e-4", "--print-settings"]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    s = load_settings(printed, {}, "lora")
    assert (s.preset, s.rank, s.alpha, s.steps, s.lr, s.text_encoder) == ("tiny", 16, 8.0, 50, 3e-4, True)
    assert s == load_settings(cfg, {"lr": 3e-4}, "lora", family="tiny")
    assert not (tmp_path / "out").exists()  # nothing run, nothing written
    assert main(["train", "lora", "--config", str(cfg), "--rank", "0", "--print-settings"]) == 2
    assert capsys.readouterr().err.strip().endswith("--rank 0: must be at least 1")


def test_clip_skip_is_counted_as_a1111_counts_it(tmp_path):
    """sd-scripts counts SD 2.x's clip skip one less than A1111 (its stored encoder lacks OpenCLIP's last layer):
    its 2 is sdtune's 3 there, and the same 2 elsewhere; the run writes sd-scripts' count back."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('pretrained_model_name_or_path = "m"\nclip_skip = 2\n')
    assert [load_settings(cfg, {}, "lora", family=f).clip_skip for f in ("sd1", "sd2", "sdxl")] == [2, 3, 2]
    assert kohya_clip_skip(families.SD2, 3) == "2"


def test_a_textual_inversion_config_reads_for_train_ti(tmp_path):
    cfg = tmp_path / "ti.toml"
    cfg.write_text('pretrained_model_name_or_path = "m"\ntoken_string = "mychar"\ninit_word = "girl"\n'
                   'num_vectors_per_token = 4\nuse_style_template = true\nlearning_rate = 5e-3\nxformers = true\n')
    s = load_settings(cfg, {}, "ti", family="sd1")
    assert (s.token, s.init_token, s.num_vectors, s.property, s.lr) == ("mychar", "girl", 4, "style", 5e-3)
    with pytest.raises(SdtuneError, match=r"ti.toml: token_string makes it a textual inversion config; use sdtune "
                                          r"train ti$"):
        load_settings(cfg, {}, "lora", family="sd1")
    cfg.write_text('pretrained_model_name_or_path = "m"\nnetwork_module = "networks.lora"\n')
    with pytest.raises(SdtuneError, match=r"network_module makes it a LoRA config; use sdtune train lora$"):
        load_settings(cfg, {}, "ti", family="sd1")


def _train_from_config(tmp_path, capsys, network: str):
    """The output folder of a 2-step run on tiny-random from a kohya config with ``network``'s keys."""
    data = outline_dataset(tmp_path / "data")
    out = tmp_path / "out"
    cfg = tmp_path / "config_lora.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "tiny-random"\ntrain_data_dir = "{data}"\noutput_dir = "{out}"\n'
                   f'output_name = "k"\n{network}\nmax_train_steps = 2\ntrain_batch_size = 2\n')
    assert main(["train", "lora", "--config", str(cfg), "--sample-every", "0", "--no-report", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "k.safetensors")
    return out


def test_a_run_from_a_kohya_config_trains_and_reruns_from_its_own_settings(tmp_path, capsys):
    out = _train_from_config(tmp_path, capsys, 'network_module = "networks.lora"\nnetwork_dim = 4\nnetwork_alpha = 4\n'
                                               'network_train_unet_only = true\nlearning_rate = 1e-3\nxformers = true\n'
                                               'save_model_as = "safetensors"')
    saved = (out / loop.SETTINGS_FILE).read_text()
    assert 'name = "k"' in saved and "rank = 4" in saved and "text_encoder = false" in saved and "xformers" not in saved
    assert main(["train", "lora", "--config", str(out / loop.SETTINGS_FILE), "--no-progress"]) == 0  # done: kept
    assert "already finished" in capsys.readouterr().err


def test_a_kohya_oft_config_trains_blocks_of_its_count_and_saves_them_as_lycoris_diag_oft(tmp_path, capsys):
    """networks.oft: 4 blocks in every attention and convolution layer, whatever the width, at the file's
    constraint; written in LyCORIS's layout (lora_unet_ keys, as ``sdtune convert`` writes kohya's oft_unet_ ones),
    which A1111 and ComfyUI read, and loaded back by sdtune as the rotation trained."""
    out = _train_from_config(tmp_path, capsys, 'network_module = "networks.oft"\nnetwork_dim = 4\nnetwork_alpha = 0.01\n'
                                               'network_args = ["enable_conv=True"]\nlearning_rate = 1e-2')
    with safe_open(out / "k.safetensors", "pt") as f:
        blocks = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".oft_blocks")}
        alphas = {round(f.get_tensor(k).item(), 6) for k in f.keys() if k.endswith(".alpha")}
        meta = f.metadata()
    assert blocks and all(k.startswith("lora_unet_") for k in blocks) and alphas == {0.01}
    assert {b.shape[0] for b in blocks.values()} == {4} and len({b.shape[1] for b in blocks.values()}) > 1
    assert any("_resnets_" in k for k in blocks) and not any("_ff_" in k or "proj_in" in k for k in blocks)
    assert all(b.abs().sum() > 0 for b in blocks.values())  # every layer trained
    assert json.loads(meta["ss_network_args"])["algo"] == "diag-oft"


def test_rank_dropout_scale_false_is_noted_only_where_rows_are_dropped(tmp_path, recwarn):
    """sdtune scales the rows rank dropout keeps by 1/(1 - p) (LyCORIS's rank_dropout_scale=True): a config that
    turns the switch off while dropping rows is told so; kohya_ss's default False with no rank dropout is not."""
    cfg = tmp_path / "c.toml"
    for dropout, noted in (("0.1", True), ("0", False)):
        cfg.write_text('pretrained_model_name_or_path = "m"\nnetwork_module = "lycoris.kohya"\nnetwork_args = '
                       f'["algo=loha", "rank_dropout={dropout}", "rank_dropout_scale=False"]\n')
        recwarn.clear()
        assert load_settings(cfg, {}, "lora", family="sd1").rank_dropout == float(dropout)
        said = [str(w.message) for w in recwarn if "rank_dropout_scale" in str(w.message)]
        assert said == ([f"{cfg}: network_args rank_dropout_scale=False: sdtune scales the rows rank dropout keeps "
                         f"by 1/(1 - rank_dropout), as rank_dropout_scale=True does"] if noted else [])


def test_full_fp16_trains_the_network_in_fp32_under_fp16_and_says_so(tmp_path, recwarn):
    """sd-scripts' full_fp16 (the network's weights, gradients and optimizer state in fp16, with mixed_precision
    fp16): run with them in fp32 under fp16 autocast, said in a note, not refused (the model is fp16 either way)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('pretrained_model_name_or_path = "m"\nmixed_precision = "fp16"\nfull_fp16 = true\n')
    s = load_settings(cfg, {}, "lora", family="sd1")
    assert s.mixed_precision == "fp16" and not s.full_bf16
    said = [str(w.message) for w in recwarn if "full_fp16" in str(w.message)]
    assert said == [f"{cfg}: full_fp16 = true: sdtune keeps the network's weights, gradients and optimizer state in "
                    f"fp32 under fp16 mixed precision (the model's own weights are fp16 either way); only they take "
                    f"more memory (full_bf16 = true halves them on a GPU with bf16)"]
