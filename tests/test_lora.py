"""LoRA: tags, the name mapping for every key of real-shaped files, merging, parity with diffusers."""

import copy
import hashlib
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers import V1_CONFIG, randomize_, rel_err, tiny_config
from ldm.checkpoint import build_model
from ldm.config import model_config
from ldm.lora import (Lora, LoraError, LoraLibrary, LoraMerger, LoraUse, diffusers_unet_name, lora_hash,
                      lora_targets, parse_cli_lora, parse_tags, unet_block_names)

TOL = 1e-4
V2_CONFIG = "configs/stable-diffusion/v2-inference.yaml"


# ----------------------------------------------------------------------------- tags


def test_tags_are_parsed_and_removed():
    text, uses = parse_tags("a <lora:detail:0.6> fox, <lora:style:0.5:1.25>, <LORA:x>")
    assert text == "a  fox, , "
    assert uses == [LoraUse("detail", 0.6, 0.6), LoraUse("style", 0.5, 1.25), LoraUse("x", 1.0, 1.0)]
    with pytest.raises(LoraError, match="not a number"):
        parse_tags("<lora:detail:lots>")
    with pytest.raises(LoraError, match="finite"):
        parse_tags("<lora:detail:nan>")
    with pytest.raises(LoraError, match="at most two"):
        parse_tags("<lora:detail:1:2:3>")
    assert parse_cli_lora("models/Lora/a.safetensors:0.5") == ("models/Lora/a.safetensors", 0.5)
    assert parse_cli_lora("C:/loras/a.safetensors") == ("C:/loras/a.safetensors", 1.0)
    with pytest.raises(LoraError, match="not a number"):
        parse_cli_lora("a.safetensors:.x")


# ----------------------------------------------------------------------------- names


def _diffusers_unet(config, sd, device=None):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
    return cfg, sfu.convert_ldm_unet_checkpoint(sd, cfg)


@pytest.mark.parametrize("which", ["tiny", "v1", "v2"])
def test_unet_names_agree_with_diffusers_converter(which):
    """Our original -> diffusers naming of every UNet Linear / Conv2d weight is the one diffusers' own
    converter applies (tensors followed by identity, on the meta device: any size is cheap)."""
    config = tiny_config() if which == "tiny" else {"model": model_config(V1_CONFIG if which == "v1" else V2_CONFIG)}
    model = build_model(config, "meta")
    sd = model.state_dict()
    _, converted = _diffusers_unet(config, sd)
    name_of = {id(t): k for k, t in converted.items()}
    unet = model.model.diffusion_model
    blocks = unet_block_names(unet)
    n = 0
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            tensor = sd["model.diffusion_model." + name + ".weight"]
            assert diffusers_unet_name(name, blocks) + ".weight" == name_of[id(tensor)], name
            n += 1
    assert n > 50


def _meta_diffusers_unet_and_clip_l(config_path):
    """Our model, diffusers' UNet for its config and transformers' CLIP ViT-L text model: real sizes, on meta."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {"model": model_config(config_path)}
    model = build_model(config, "meta")
    cfg, _ = _diffusers_unet(config, model.state_dict())
    with torch.device("meta"):
        return (model, UNet2DConditionModel(**cfg),
                CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                             num_attention_heads=12)))


def _kohya_keys_v1_full():
    """Every module a kohya LoRA / LoCon for SD v1 can carry, with its weight shape, from diffusers' UNet
    and transformers' CLIP text model at the real sizes (built on the meta device)."""
    model, unet, clip = _meta_diffusers_unet_and_clip_l(V1_CONFIG)
    shapes = {}
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            shapes["lora_unet_" + name.replace(".", "_")] = tuple(m.weight.shape)
    for name, m in clip.named_modules():
        if isinstance(m, nn.Linear):
            name = name if name.startswith("text_model.") else "text_model." + name
            shapes["lora_te_" + name.replace(".", "_")] = tuple(m.weight.shape)
    return model, shapes


def _random_lora(shapes, rank=4, seed=0, alpha=None, device=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if device == "meta":
            down = torch.empty((rank, *shape[1:]), device="meta", dtype=dtype)
            up = torch.empty((shape[0], rank, *([1] * (len(shape) - 2))), device="meta", dtype=dtype)
        else:
            down = (torch.randn((rank, *shape[1:]), generator=g) / math.sqrt(math.prod(shape[1:]))).to(dtype)
            up = (torch.randn((shape[0], rank, *([1] * (len(shape) - 2))), generator=g) / math.sqrt(rank)).to(dtype)
        sd[name + ".lora_down.weight"] = down
        sd[name + ".lora_up.weight"] = up
        sd[name + ".alpha"] = torch.tensor(float(alpha if alpha is not None else rank / 2))
    return sd


def test_every_key_of_a_real_shaped_v1_kohya_locon_maps():
    """A LoRA over every Linear / Conv2d of SD v1's UNet (LoCon: 3x3 convolutions included) and text encoder,
    at the real shapes: every key finds its layer and its shape fits."""
    model, shapes = _kohya_keys_v1_full()
    assert len(shapes) > 300
    lora = Lora.from_state_dict("full", "full.safetensors", _random_lora(shapes, device="meta"), model)
    params = dict(model.named_parameters())
    assert len(lora.modules) == len(shapes)
    assert len({m.target.key for m in lora.modules}) == len(shapes)  # no two modules on one weight
    for m in lora.modules:
        assert tuple(params[m.target.key].shape) == shapes[m.name], m.name
    parts = {m.target.part for m in lora.modules}
    assert parts == {"unet", "te"}


def test_sd2_text_encoder_names_map_to_stacked_qkv_rows():
    """kohya names a 2.x text encoder by transformers' CLIP names; q/k/v land in rows of OpenCLIP's in_proj_weight."""
    model = build_model({"model": model_config(V2_CONFIG)}, "meta")
    table, _ = lora_targets(model)
    w = 1024
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        t = table[f"lora_te_text_model_encoder_layers_22_self_attn_{proj}"]
        assert t.key == "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"
        assert t.rows == (j * w, (j + 1) * w)
    assert table["lora_te_text_model_encoder_layers_0_mlp_fc2"].key == \
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight"
    # a v1 LoRA (768-wide text encoder, 768-wide context) does not fit
    _, shapes = _kohya_keys_v1_full()
    with pytest.raises(LoraError, match=r"does not fit"):
        Lora.from_state_dict("v1", "v1.safetensors", _random_lora(shapes, device="meta"), model)


def test_sdxl_file_on_v1_names_the_first_bad_key():
    model = build_model(tiny_config(), "meta")
    sd = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 64),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 4)}
    with pytest.raises(LoraError, match=r"lora_te1_text_model_encoder_layers_0_mlp_fc1.*SDXL"):
        Lora.from_state_dict("xl", "xl.safetensors", sd, model)
    sd = {"lora_unet_foo.hada_w1_a": torch.zeros(4, 4)}
    with pytest.raises(LoraError, match="LoHa"):
        Lora.from_state_dict("loha", "loha.safetensors", sd, model)


# ----------------------------------------------------------------------------- merging


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = randomize_(build_model(config, "cpu"), seed=3).eval()
    return config, model


def _tiny_kohya_shapes(model, convs=True):
    """kohya names of the tiny model: attention, feed-forward, projections, and (LoCon) the ResBlock,
    down- and upsampling convolutions; text encoder q/k/v/out/fc1/fc2."""
    from test_model_parity import _reference_models

    config = tiny_config()
    unet, _, clip = _reference_models(config, model.state_dict())
    shapes = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if "attentions" in name or (convs and any(s in name for s in ("resnets", "samplers"))):
            shapes["lora_unet_" + name.replace(".", "_")] = tuple(m.weight.shape)
    for name, m in clip.named_modules():
        if isinstance(m, nn.Linear):
            name = name if name.startswith("text_model.") else "text_model." + name
            shapes["lora_te_" + name.replace(".", "_")] = tuple(m.weight.shape)
    return shapes, unet, clip


def test_merge_is_the_runtime_formula_and_removal_is_exact(tiny):
    _, base = tiny
    model = copy.deepcopy(base)
    shapes, _, _ = _tiny_kohya_shapes(model)
    lora = Lora.from_state_dict("a", "a.safetensors", _random_lora(shapes, seed=1), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merger = LoraMerger(model)
    merger.apply([(lora, 0.7, 1.3)])
    g = torch.Generator().manual_seed(5)
    modules = dict(model.named_modules())
    checked = set()
    for m in lora.modules:
        layer = modules[m.target.key.rsplit(".", 1)[0]]
        mult = 0.7 if m.target.part == "te" else 1.3
        w0 = before[m.target.key]
        if isinstance(layer, nn.Conv2d):
            x = torch.randn(1, layer.in_channels, 8, 8, generator=g)
            base_out = nn.functional.conv2d(x, w0, layer.bias, layer.stride, layer.padding)
            low = nn.functional.conv2d(x, m.down, None, layer.stride, layer.padding)  # LoCon: down is kxk, up 1x1
            want = base_out + mult * m.scale * nn.functional.conv2d(low, m.up)
            checked.add(("conv", layer.kernel_size))
        else:
            x = torch.randn(3, layer.in_features, generator=g)
            want = nn.functional.linear(x, w0, layer.bias) + mult * m.scale * (x @ m.down.T @ m.up.T)
            checked.add(("linear", m.target.part))
        with torch.no_grad():
            assert rel_err(layer(x), want) < 1e-5, m.target.key
    assert {("conv", (3, 3)), ("conv", (1, 1)), ("linear", "te"), ("linear", "unet")} <= checked
    merger.apply([])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit for bit


def test_switching_sets_without_reloading(tiny):
    _, base = tiny
    model = copy.deepcopy(base)
    shapes, _, _ = _tiny_kohya_shapes(model)
    a = Lora.from_state_dict("a", "a.safetensors", _random_lora(shapes, seed=1), model)
    b = Lora.from_state_dict("b", "b.safetensors", _random_lora(dict(list(shapes.items())[::2]), seed=2), model)
    merger = LoraMerger(model)
    merger.apply([(b, 1.0, 0.5)])
    only_b = {k: v.clone() for k, v in model.state_dict().items()}
    merger.apply([(a, 1.0, 1.0), (b, 1.0, 0.5)])
    assert merger.apply([(a, 1.0, 1.0), (b, 1.0, 0.5)]) is False  # already there: nothing done
    merger.apply([(b, 1.0, 0.5)])
    assert all(torch.equal(v, only_b[k]) for k, v in model.state_dict().items())
    merger.apply([])
    base_sd = base.state_dict()
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())


def test_packed_model_gives_the_merged_result(tiny):
    from ldm.backends import optimize

    _, base = tiny
    ref = copy.deepcopy(base)
    fast = optimize(copy.deepcopy(base))
    shapes, _, _ = _tiny_kohya_shapes(ref)
    sd = _random_lora(shapes, seed=4)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0])
    ctx = torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        fast.apply_model(x, t, ctx)  # packs the weights and keeps the text's keys and values
        for model in (ref, fast):
            LoraMerger(model).apply([(Lora.from_state_dict("a", "a.safetensors", sd, model), 1.0, 1.0)])
        assert rel_err(fast.apply_model(x, t, ctx), ref.apply_model(x, t, ctx)) < TOL


# ----------------------------------------------------------------------------- parity with diffusers


def _diffusers_pipe(model):
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from test_model_parity import _reference_models

    unet, vae, clip = _reference_models(tiny_config(), model.state_dict())
    return StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _peft_lora(shapes, seed):
    """The same kind of LoRA in diffusers' PEFT layout: unet.<path>.lora_A/lora_B, text_encoder.<path>."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, name, shape in shapes:
        rank = 4
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn((rank, *shape[1:]), generator=g) / math.sqrt(math.prod(shape[1:]))
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn((shape[0], rank, *([1] * (len(shape) - 2))), generator=g) / 2
    return sd


def _compare_with_diffusers(model, base, pipe):
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([900.0, 30.0])
    ctx = torch.randn(2, 77, 64, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 12:] = 49406, 49407
    with torch.no_grad():
        eps, hidden = model.apply_model(x, t, ctx), model.cond_stage_model.encode_ids(ids)
        assert rel_err(eps, pipe.unet(x, t, encoder_hidden_states=ctx).sample) < TOL
        assert rel_err(hidden, pipe.text_encoder(input_ids=ids).last_hidden_state) < TOL
        # and the LoRA does change both (the comparison above is not of two base models)
        assert rel_err(eps, base.apply_model(x, t, ctx)) > 1e-2
        assert rel_err(hidden, base.cond_stage_model.encode_ids(ids)) > 1e-2


def test_kohya_parity_with_diffusers_fuse_lora(tiny):
    _, base = tiny
    model = copy.deepcopy(base)
    shapes, _, _ = _tiny_kohya_shapes(model)
    sd = _random_lora(shapes, seed=6, alpha=3.0)
    pipe = _diffusers_pipe(model)
    pipe.load_lora_weights(dict(sd), adapter_name="a")
    pipe.fuse_lora(lora_scale=0.8)
    lora = Lora.from_state_dict("a", "a.safetensors", sd, model)
    assert len(lora.modules) == len(shapes)
    LoraMerger(model).apply([(lora, 0.8, 0.8)])
    _compare_with_diffusers(model, base, pipe)


@pytest.mark.slow
def test_peft_parity_with_diffusers_fuse_lora(tiny):
    _, base = tiny
    model = copy.deepcopy(base)
    _, unet, clip = _tiny_kohya_shapes(model)
    shapes = [("unet.", n, tuple(m.weight.shape)) for n, m in unet.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and "attentions" in n]
    shapes += [("unet.", n, tuple(m.weight.shape)) for n, m in unet.named_modules()
               if isinstance(m, nn.Conv2d) and "resnets" in n and n.endswith("conv1")]
    shapes += [("text_encoder.", n, tuple(m.weight.shape)) for n, m in clip.named_modules() if isinstance(m, nn.Linear)]
    sd = _peft_lora(shapes, seed=7)
    pipe = _diffusers_pipe(model)
    pipe.load_lora_weights(dict(sd), adapter_name="p")
    pipe.fuse_lora(lora_scale=1.0)
    lora = Lora.from_state_dict("p", "p.safetensors", sd, model)
    assert len(lora.modules) == len(shapes) and all(m.scale == 1.0 for m in lora.modules)
    LoraMerger(model).apply([(lora, 1.0, 1.0)])
    _compare_with_diffusers(model, base, pipe)


# ----------------------------------------------------------------------------- files and the folder


def test_library_finds_by_stem_suggests_names_and_hashes_like_the_web_ui(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, model = tiny
    shapes, _, _ = _tiny_kohya_shapes(model, convs=False)
    folder = tmp_path / "Lora"
    (folder / "sub").mkdir(parents=True)
    save_file(_random_lora(shapes, seed=1), str(folder / "sub" / "detail_tweaker.safetensors"))
    lib = LoraLibrary(model, folder)
    assert len(lib.get("detail_tweaker").modules) == len(shapes)
    with pytest.raises(LoraError, match=r"unknown LoRA 'detail_tweeker'.*closest: detail_tweaker"):
        lib.get("detail_tweeker")
    path = folder / "sub" / "detail_tweaker.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + n:]).hexdigest()[:12]  # the "addnet" hash: tensors only
    assert lib.find_by_hash("renamed", lora_hash(path)) == path
    from ldm import hashing

    cached = {k: v for k, v in hashing._read_cache().items() if k.startswith("lora|")}
    assert list(cached.values()) == [lora_hash(path)] and hashing.hashed_before() == []  # not taken for a model
    torch.save(_random_lora(shapes, seed=2), folder / "old.pt")
    assert lora_hash(folder / "old.pt") == hashlib.sha256((folder / "old.pt").read_bytes()).hexdigest()[:12]
    assert len(lib.get("old").modules) == len(shapes)
    bad = {k: v for k, v in _random_lora(shapes, seed=1).items() if "lora_up" not in k or "te_" in k}
    save_file(bad, str(folder / "broken.safetensors"))
    with pytest.raises(LoraError, match="no matching up weight"):
        lib.get("broken")


# ----------------------------------------------------------------------------- end to end


def _main(args):
    import contextlib
    import io

    from ldm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def _one_error(err):
    return "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1


def test_cli_lora_tags_embeddings_metadata_and_from_png(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from helpers import write_tiny_model
    from ldm import images as imagelib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config, ckpt = write_tiny_model(tmp_path)
        model = build_model(tiny_config(), "meta")
        shapes, _, _ = _tiny_kohya_shapes(randomize_(build_model(tiny_config(), "cpu")))
        (tmp_path / "Lora").mkdir()
        save_file(_random_lora(shapes, seed=8, alpha=4.0), str(tmp_path / "Lora" / "detail.safetensors"))
        (tmp_path / "emb").mkdir()
        torch.save({"string_to_param": {"*": torch.randn(2, 64)}}, tmp_path / "emb" / "mychar.pt")
        del model
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox <lora:detail:0.9:1.5>, mychar\na fox, mychar\n")
        common = ["--config", config, "--ckpt", ckpt, "--H", 64, "--W", 64, "--ddim_steps", 2, "--no_safety_checker",
                  "--lora_dir", tmp_path / "Lora", "--embeddings_dir", tmp_path / "emb", "--n_iter", 1]
        code, err = _main(common + ["--outdir", tmp_path / "mixed", "--from-file", prompts, "--n_samples", 1,
                                    "--clip_skip", 2])
        assert code == 0, err
        first, second = tmp_path / "mixed/samples/00000.png", tmp_path / "mixed/samples/00001.png"
        meta = imagelib.parse_parameters(imagelib.read_parameters(first))
        assert meta["prompt"] == "a fox <lora:detail:0.9:1.5>, mychar"
        s = meta["settings"]
        assert s["Lora hashes"] == f"detail: {lora_hash(tmp_path / 'Lora' / 'detail.safetensors')}"
        emb_hash = hashlib.sha256((tmp_path / "emb" / "mychar.pt").read_bytes()).hexdigest()[:12]
        assert s["TI hashes"] == f"mychar: {emb_hash}" and s["Clip skip"] == "2"
        assert "Lora hashes" not in imagelib.parse_parameters(imagelib.read_parameters(second))["settings"]

        def pixels(p):
            return np.asarray(Image.open(p).convert("RGB"))

        # the second image, made after the LoRA was merged and taken out, is the image of a run without it
        code, err = _main(common + ["--outdir", tmp_path / "plain", "--prompt", "a fox, mychar", "--n_samples", 1,
                                    "--clip_skip", 2, "--seed", 43])
        assert code == 0, err
        assert np.array_equal(pixels(tmp_path / "plain/samples/00000.png"), pixels(second))
        assert not np.array_equal(pixels(first), pixels(second))

        # --from_png re-renders it, finding the LoRA by its hash under another name
        (tmp_path / "Lora2").mkdir()
        (tmp_path / "Lora" / "detail.safetensors").rename(tmp_path / "Lora2" / "renamed.safetensors")
        code, err = _main(["--config", config, "--ckpt", ckpt, "--no_safety_checker", "--lora_dir", tmp_path / "Lora2",
                           "--embeddings_dir", tmp_path / "emb", "--outdir", tmp_path / "again", "--from_png", first])
        assert code == 0, err
        assert np.array_equal(pixels(tmp_path / "again/samples/00000.png"), pixels(first))
        code, err = _main(["--config", config, "--ckpt", ckpt, "--no_safety_checker", "--lora_dir", tmp_path / "Lora",
                           "--embeddings_dir", tmp_path / "emb", "--outdir", tmp_path / "again", "--from_png", first])
        assert code == 1 and _one_error(err) and "'detail'" in err and "hash" in err

        code, err = _main(common + ["--outdir", tmp_path / "bad", "--prompt", "a <lora:renamd:1>",
                                    "--lora_dir", tmp_path / "Lora2"])
        assert code == 1 and _one_error(err) and "closest: renamed" in err
        code, err = _main(common + ["--outdir", tmp_path / "bad", "--prompt", "a <lora:renamed:x>"])
        assert code == 1 and "not a number" in err and _one_error(err)
        assert not (tmp_path / "bad" / "samples").exists() or not list((tmp_path / "bad" / "samples").iterdir())
    finally:
        torch.set_num_threads(threads)


SDXL_CONFIG = "configs/sdxl/sd_xl_base.yaml"


def test_every_key_of_a_real_shaped_sdxl_diffusers_lora_maps():
    """SDXL: diffusers-layout names (unet.*, text_encoder.*, text_encoder_2.*) at the real shapes find their
    layers (lora_te1_ -> CLIP-L, lora_te2_ -> OpenCLIP bigG with stacked q/k/v)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model, unet, te1 = _meta_diffusers_unet_and_clip_l(SDXL_CONFIG)
    with torch.device("meta"):
        te2 = CLIPTextModel(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                           num_attention_heads=20, hidden_act="gelu"))
    sd, shapes = {}, {}
    for prefix, tower in (("unet.", unet), ("text_encoder.", te1), ("text_encoder_2.", te2)):
        for name, m in tower.named_modules():
            if isinstance(m, nn.Linear) and (prefix != "unet." or "attentions" in name):
                sd[f"{prefix}{name}.lora_A.weight"] = torch.empty(4, m.in_features, device="meta")
                sd[f"{prefix}{name}.lora_B.weight"] = torch.empty(m.out_features, 4, device="meta")
                shapes[prefix + name] = tuple(m.weight.shape)
    lora = Lora.from_state_dict("xl", "xl.safetensors", sd, model)
    assert len(lora.modules) == len(shapes) > 900  # every linear of the UNet's attentions and of both text encoders
    assert {m.name[:9] for m in lora.modules if m.target.part == "te"} == {"lora_te1_", "lora_te2_"}
    assert sum(m.target.rows is not None for m in lora.modules) == 3 * 32  # bigG's q, k, v


def test_lora_for_every_image_equals_the_tag(tmp_path, tiny, monkeypatch):
    """Txt2Img(loras=[(file, m)]) (the command line's --lora FILE:m) is the tag <lora:NAME:m> in every prompt."""
    import numpy as np

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from ldm.pipeline import Txt2Img

    _, base = tiny
    shapes, _, _ = _tiny_kohya_shapes(base, convs=False)
    (tmp_path / "Lora").mkdir()
    save_file(_random_lora(shapes, seed=11), str(tmp_path / "Lora" / "detail.safetensors"))
    run = dict(n_samples=1, n_iter=1, steps=2, H=64, W=64, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tagged = Txt2Img(copy.deepcopy(base), lora_dir=tmp_path / "Lora")("a fox <lora:detail:0.5>", **run)[0]
        flag = Txt2Img(copy.deepcopy(base), loras=[(tmp_path / "Lora" / "detail.safetensors", 0.5)])("a fox", **run)[0]
        plain = Txt2Img(copy.deepcopy(base))("a fox", **run)[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.asarray(tagged.image), np.asarray(flag.image))
    assert not np.array_equal(np.asarray(plain.image), np.asarray(flag.image))
    assert tagged.settings["Lora hashes"] == flag.settings["Lora hashes"] == \
        f"detail: {lora_hash(tmp_path / 'Lora' / 'detail.safetensors')}"


def test_sd2_text_encoder_lora_equals_the_same_lora_on_transformers_clip():
    """A kohya LoRA for a 2.x text encoder (transformers' names) merged into our OpenCLIP tower (q/k/v as rows of
    in_proj_weight) gives what the same LoRA merged by the plain formula into transformers' CLIPTextModel gives."""
    from test_sd2 import hf_text_model, tiny_v2_config

    model = randomize_(build_model(tiny_v2_config(), "cpu"), seed=4).eval()
    hf = hf_text_model(model.cond_stage_model, model.cond_stage_model.n_blocks)
    shapes, layers = {}, {}
    for name, m in hf.named_modules():
        if isinstance(m, nn.Linear):
            full = name if name.startswith("text_model.") else "text_model." + name
            shapes["lora_te_" + full.replace(".", "_")] = tuple(m.weight.shape)
            layers["lora_te_" + full.replace(".", "_")] = m
    sd = _random_lora(shapes, seed=12, alpha=2.0)
    with torch.no_grad():
        for name, m in layers.items():
            m.weight += 0.6 * (2.0 / 4) * sd[name + ".lora_up.weight"] @ sd[name + ".lora_down.weight"]
    lora = Lora.from_state_dict("v2", "v2.safetensors", sd, model)
    assert sum(m.target.rows is not None for m in lora.modules) == 3 * model.cond_stage_model.n_blocks
    LoraMerger(model).apply([(lora, 0.6, 0.0)])
    ids = model.cond_stage_model.tokenizer(["a castle on a hill, oil painting"])
    with torch.no_grad():
        assert rel_err(model.cond_stage_model.encode_ids(ids), hf(input_ids=ids).last_hidden_state) < TOL
