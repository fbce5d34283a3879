"""Checkpoint reading: every file variant found in the wild, and every way a file can be wrong."""

import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from helpers import V1_CONFIG, randomize_, tiny_config
from ldm.checkpoint import (CheckpointError, build_model, ema_key, load_model, normalize_state_dict,
                            read_state_dict)
from ldm.config import ConfigError
from ldm.models.diffusion import SCHEDULE_BUFFERS

POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight tiny model, its config file and its state dict in the original layout."""
    d = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config()
    config_path = d / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config_path)
    model = randomize_(build_model(cfg, "cpu"), seed=3).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    return config_path, model, sd


def _same_weights(model, sd, dtype=torch.float32):
    loaded = model.state_dict()
    for k, v in sd.items():
        if k in SCHEDULE_BUFFERS or k == POS:
            continue
        assert torch.equal(loaded[k], v.to(dtype)), k


def test_safetensors_roundtrip_and_zero_copy(tiny, tmp_path):
    config, _, sd = tiny
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model = load_model(config, path)
    _same_weights(model, sd)
    assert model.betas.dtype == torch.float32 and model.betas.device.type == "cpu"
    assert model.cond_stage_model.transformer.text_model.embeddings.position_ids.tolist() == [list(range(77))]
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    # Float32 weights from a float32 file are views into the memory-mapped file, not copies.
    raw = read_state_dict(path)
    w = raw["model.diffusion_model.out.2.weight"]
    assert not w.untyped_storage().resizable()  # a view of the mmap buffer, not a copy
    assert torch.equal(w, sd["model.diffusion_model.out.2.weight"])


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_with_and_without_state_dict_wrapper(tiny, tmp_path, wrapped):
    config, _, sd = tiny
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6} if wrapped else sd, path)
    _same_weights(load_model(config, path), sd)


def test_sd_v1_style_ckpt_with_pickled_lightning_callback(tiny, tmp_path):
    """sd-v1-4.ckpt pickles Lightning's ModelCheckpoint class as a key of its `callbacks` dict. The file is
    written with a stand-in class under Lightning's module path (what a pickle records is that path), and
    read without Lightning importable: the loader never imports what a pickle names."""
    import sys
    import types

    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    saved = {name: sys.modules.get(name) for name in names}
    module = types.ModuleType(names[-1])
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    module.ModelCheckpoint = ModelCheckpoint
    config, _, sd = tiny
    path = tmp_path / "sd-v1-x.ckpt"
    try:
        sys.modules.update({name: types.ModuleType(name) for name in names[:-1]})
        sys.modules[names[-1]] = module
        torch.save({"state_dict": sd, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {ModelCheckpoint: {"best_model_score": None, "dirpath": "/logs"}}}, path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    assert b"pytorch_lightning.callbacks.model_checkpoint" in path.read_bytes() or _zip_mentions(path, "ModelCheckpoint")
    _same_weights(load_model(config, path), sd)


def _zip_mentions(path, text):
    import zipfile

    with zipfile.ZipFile(path) as z:
        return any(text.encode() in z.read(n) for n in z.namelist() if n.endswith(".pkl"))


def test_legacy_non_zip_ckpt(tiny, tmp_path):
    config, _, sd = tiny
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=False)
    _same_weights(load_model(config, path), sd)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tiny, tmp_path):
    config, _, sd = tiny
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*never code"):
        load_model(config, path)
    assert not marker.exists()
    # A plain pickle (not torch's zip format) with the same payload is refused too.
    path2 = tmp_path / "evil2.ckpt"
    with open(path2, "wb") as f:
        pickle.dump({"state_dict": {}, "x": _RunsCode(marker)}, f)
    with pytest.raises(CheckpointError):
        read_state_dict(path2)
    assert not marker.exists()


def test_clip_keys_without_text_model_prefix(tiny, tmp_path):
    config, _, sd = tiny
    prefix = "cond_stage_model.transformer."
    old = {(prefix + k[len(prefix + "text_model."):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    path = tmp_path / "old_clip.safetensors"
    save_file(old, str(path))
    _same_weights(load_model(config, path), sd)


def test_position_ids_absent_or_float(tiny, tmp_path):
    config, _, sd = tiny
    no_pos = {k: v for k, v in sd.items() if k != POS}
    path = tmp_path / "nopos.safetensors"
    save_file(no_pos, str(path))
    m = load_model(config, path)
    assert m.cond_stage_model.transformer.text_model.embeddings.position_ids.tolist() == [list(range(77))]
    drifted = dict(sd)
    drifted[POS] = torch.arange(77, dtype=torch.float32)[None] - 1e-3  # seen in some merged fine-tunes
    path = tmp_path / "floatpos.safetensors"
    save_file(drifted, str(path))
    m = load_model(config, path)
    pos = m.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert pos.dtype == torch.long and pos.tolist() == [list(range(77))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tiny, tmp_path, dtype):
    config, _, sd = tiny
    half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    m = load_model(config, path)  # into float32
    assert next(m.parameters()).dtype == torch.float32
    _same_weights(m, half)
    m16 = load_model(config, path, dtype=dtype)
    assert next(m16.parameters()).dtype == dtype
    assert m16.betas.dtype == torch.float32  # the schedule stays float32


def test_full_ema_checkpoint_choice(tiny, tmp_path):
    config, _, sd = tiny
    g = torch.Generator().manual_seed(9)
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    ema = {ema_key(k): torch.randn(sd[k].shape, generator=g) for k in unet_keys}
    assert ema_key("model.diffusion_model.input_blocks.1.1.proj_in.weight") == "model_ema.diffusion_modelinput_blocks11proj_inweight"
    full = {**sd, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)}
    path = tmp_path / "full-ema.ckpt"
    torch.save({"state_dict": full}, path)
    plain = load_model(config, path)
    _same_weights(plain, sd)
    with_ema = load_model(config, path, use_ema=True)
    loaded = with_ema.state_dict()
    for k in unet_keys:
        assert torch.equal(loaded[k], ema[ema_key(k)]), k
    assert torch.equal(loaded["first_stage_model.decoder.conv_out.weight"], sd["first_stage_model.decoder.conv_out.weight"])
    no_ema = tmp_path / "no-ema.safetensors"
    save_file(sd, str(no_ema))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_model(config, no_ema, use_ema=True)


def test_schedule_buffers_and_training_keys_are_handled(tiny, tmp_path):
    config, _, sd = tiny
    extra = {**sd, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
             "lvlb_weights": torch.ones(1000)}
    weights, extras = normalize_state_dict(extra)
    assert set(extras) == set(SCHEDULE_BUFFERS)
    assert not any(k.startswith("model_ema") or k == "lvlb_weights" for k in weights)
    # A file without the schedule buffers loads, and the buffers are recomputed from the config.
    no_sched = {k: v for k, v in sd.items() if k not in SCHEDULE_BUFFERS}
    path = tmp_path / "nosched.safetensors"
    save_file(no_sched, str(path))
    m = load_model(config, path)
    assert torch.allclose(m.alphas_cumprod, sd["alphas_cumprod"])
    assert abs(m.alphas_cumprod[-1].item() - 0.0046600) < 1e-6  # the v1 schedule's last value


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    config, _, sd = tiny
    broken = {k: v for k, v in sd.items() if "output_blocks.0" not in k}
    broken["model.diffusion_model.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(CheckpointError) as e:
        load_model(config, path)
    msg = str(e.value)
    assert "missing key(s): model.diffusion_model.output_blocks.0" in msg
    assert "1 unexpected key(s): model.diffusion_model.extra.weight" in msg
    assert "\n" not in msg


def test_sd2_checkpoint_with_v1_config_is_explained(tmp_path):
    """A 2.x file has cross-attention context 1024; loading it with the v1 config names the cause."""
    cfg = tiny_config()
    cfg["model"]["params"]["unet_config"]["params"]["context_dim"] = 96
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(tiny_config()), config)
    other = build_model(cfg, "meta").state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in other.items()}
    for k in sd:
        if ".attn2.to_k." in k or ".attn2.to_v." in k:
            sd[k] = torch.zeros(sd[k].shape[0], 1024)
    path = tmp_path / "v2.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"wrong shape.*Stable Diffusion 2\.x.*1024 instead of 768"):
        load_model(config, path)


def test_unreadable_files(tiny, tmp_path):
    config, _, _ = tiny
    with pytest.raises(CheckpointError, match="not found"):
        load_model(config, tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        load_model(config, junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError):
        load_model(config, junk_st)


def test_config_errors(tmp_path):
    cfg = tiny_config()
    cfg["model"]["params"]["unet_config"]["target"] = "ldm.modules.diffusionmodules.openaimodel.Evil"
    with pytest.raises(ConfigError, match="unsupported target"):
        build_model(cfg)
    cfg = tiny_config()
    cfg["model"]["params"]["unet_config"]["params"]["bogus_option"] = 1
    with pytest.raises(ConfigError, match="unknown parameter.*bogus_option"):
        build_model(cfg)
    cfg = tiny_config()
    cfg["model"]["params"]["parameterization"] = "x0"
    with pytest.raises(ConfigError, match="parameterization 'x0' is not supported"):
        build_model(cfg)


def test_original_yaml_loads_unchanged_and_matches_sd_v1_4_layout():
    """Keys and shapes of the full-size model equal those of a real sd-v1-4.ckpt (on the meta device)."""
    sd = build_model(V1_CONFIG, "meta").state_dict()
    count = lambda p: sum(k.startswith(p) for k in sd)  # noqa: E731
    assert count("model.") == 686
    assert count("first_stage_model.") == 248
    assert count("cond_stage_model.transformer.text_model.") == 197
    assert POS in sd
    assert sum(k in sd for k in SCHEDULE_BUFFERS) == 12
    assert len(sd) == 686 + 248 + 197 + 12
    shapes = {
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
        "betas": (1000,),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert sum(v.numel() for k, v in sd.items() if k.startswith("model.")) == 859_520_964


def test_integer_weights_and_misfit_schedule_buffers_are_mismatches(tiny, tmp_path):
    """A file the reader accepts but whose tensors cannot be this model's weights is refused by the loader."""
    config, _, sd = tiny
    cases = {
        "int weight": ({"model.diffusion_model.out.2.bias": sd["model.diffusion_model.out.2.bias"].to(torch.int32)},
                       "1 non-float weight(s): model.diffusion_model.out.2.bias is int32"),
        "short schedule": ({"betas": sd["betas"][:500]},
                           "schedule buffer betas is [500] float32 in the file, [1000] float in the model"),
        "int schedule": ({"alphas_cumprod": sd["alphas_cumprod"].to(torch.int64)},
                         "schedule buffer alphas_cumprod is [1000] int64 in the file"),
        "nan scale_factor": ({"scale_factor": torch.tensor(float("nan"))}, "scale_factor is not one finite non-zero number"),
        "vector scale_factor": ({"scale_factor": torch.ones(2)}, "scale_factor is not one finite non-zero number"),
    }
    for label, (change, expected) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        save_file({**sd, **change}, str(path))
        with pytest.raises(CheckpointError) as e:
            load_model(config, path)
        assert expected in str(e.value) and "\n" not in str(e.value), (label, str(e.value))
    path = tmp_path / "scale.safetensors"  # a sane scale_factor is taken
    save_file({**sd, "scale_factor": torch.tensor(0.5)}, str(path))
    assert load_model(config, path).scale_factor == 0.5
