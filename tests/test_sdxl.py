"""SDXL base and refiner: the sgm configs, the checkpoint layout, parity with diffusers / transformers.

Tiny configs are Stability's own `configs/sdxl/*.yaml` with the widths shrunk (same classes, same
schema). The independent references are diffusers' single-file converters applied to our state dict
in the original layout, and the models they feed (transformers' `CLIPTextModel` for CLIP ViT-L,
`CLIPTextModelWithProjection` for bigG, diffusers' `UNet2DConditionModel` with
`addition_embed_type="text_time"`, `AutoencoderKL`).
"""

import contextlib
import copy
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from helpers import diffusers_layout, fast_first, randomize_, rel_err
from ldm import detect
from ldm.checkpoint import build_model, load_model
from ldm.config import load_config
from ldm.models.diffusion import SCHEDULE_BUFFERS

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "configs/sdxl/sd_xl_base.yaml"
REFINER = REPO / "configs/sdxl/sd_xl_refiner.yaml"
CLIP_L = "conditioner.embedders.0.transformer."

# Tiny sizes: CLIP-L 32 wide (hidden layer 2 of 3, as 11 of 12), bigG 48 wide (pooled 40), UNet 32 channels.
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, layer_idx=2)
TINY_BIGG = dict(width=48, layers=3, heads=4, embed_dim=40)
POOLED, CLIP_W, BIGG_W, TIME_W = 40, 32, 48, 256


def tiny_sdxl(refiner=False):
    """Stability's config with the widths shrunk: same targets, same schema."""
    cfg = copy.deepcopy(load_config(REFINER if refiner else BASE))
    p = cfg["model"]["params"]
    net = p["network_config"]["params"]
    net.update(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, num_head_channels=8)
    if refiner:
        net.update(transformer_depth=2, context_dim=[BIGG_W] * 3, adm_in_channels=POOLED + 5 * TIME_W)
    else:
        net.update(transformer_depth=[1, 1, 2], context_dim=CLIP_W + BIGG_W, adm_in_channels=POOLED + 6 * TIME_W)
    for entry in p["conditioner_config"]["params"]["emb_models"]:
        if entry["target"].endswith("FrozenCLIPEmbedder"):
            entry["params"].update(TINY_CLIP)
        elif entry["target"].endswith("FrozenOpenCLIPEmbedder2"):
            entry["params"].update(TINY_BIGG)
    p["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1)
    return cfg


def weights_only(model):
    """The state dict as the released SDXL files hold it: no schedule buffers."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if k not in SCHEDULE_BUFFERS}


def write_tiny(folder, refiner=False, seed=3, dtype=torch.float32):
    cfg = tiny_sdxl(refiner)
    name = "refiner" if refiner else "base"
    config = folder / f"tiny_{name}.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    model = randomize_(build_model(cfg, "cpu"), seed=seed)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights_only(model).items()}
    ckpt = folder / f"tiny_{name}.safetensors"
    save_file(sd, str(ckpt))
    return config, ckpt


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    return {"base": write_tiny(folder), "refiner": write_tiny(folder, refiner=True, seed=4)}


@pytest.fixture(scope="module")
def tiny_base(tiny_files):
    config, ckpt = tiny_files["base"]
    return load_config(config), load_model(load_config(config), ckpt)


@pytest.fixture(scope="module")
def tiny_refiner(tiny_files):
    config, ckpt = tiny_files["refiner"]
    return load_config(config), load_model(load_config(config), ckpt)


# ----------------------------------------------------------------------------- configs and layout


def test_configs_are_stabilitys():
    """The sgm configs, read through the alias table: scale 0.13025, eps on the v1 schedule, 1024-ready UNets."""
    base, refiner = load_config(BASE), load_config(REFINER)
    for cfg, adm in ((base, 2816), (refiner, 2560)):
        p = cfg["model"]["params"]
        assert cfg["model"]["target"] == "sgm.models.diffusion.DiffusionEngine"
        assert p["scale_factor"] == 0.13025
        assert p["network_config"]["params"]["adm_in_channels"] == adm
    model = build_model(BASE, "meta")
    assert model.scale_factor == 0.13025 and model.parameterization == "eps" and model.num_timesteps == 1000
    assert (model.linear_start, model.linear_end) == (0.00085, 0.012)
    assert model.force_zeros_for_empty_prompt and not build_model(REFINER, "meta").force_zeros_for_empty_prompt
    v1 = build_model(REPO / "configs/stable-diffusion/v1-inference.yaml", "meta")
    model.reset_schedule("cpu"), v1.reset_schedule("cpu")
    assert torch.equal(model.alphas_cumprod, v1.alphas_cumprod)  # LegacyDDPMDiscretization is v1's schedule


def _clip_configs():
    from transformers import CLIPTextConfig

    vit_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                           projection_dim=768)
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    return vit_l, big_g


def _text_layouts(sd, bigg_prefix):
    """Our text encoders' keys through diffusers' converters, and transformers' ViT-L / bigG models on meta."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vit_l_cfg, big_g_cfg = _clip_configs()
    checkpoint = {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}
    with torch.device("meta"):
        vit_l, big_g = CLIPTextModel(vit_l_cfg), CLIPTextModelWithProjection(big_g_cfg)

    def shapes(d):
        return {k.removeprefix("text_model."): tuple(v.shape) for k, v in d.items() if not k.endswith("position_ids")}

    out = {"bigg": (shapes(convert_open_clip_checkpoint(big_g, checkpoint, prefix=bigg_prefix)),
                    shapes(big_g.state_dict()))}
    if any(k.startswith(CLIP_L) for k in sd):
        out["clip"] = (shapes(convert_ldm_clip_checkpoint(checkpoint)), shapes(vit_l.state_dict()))
    return out


@pytest.mark.slow  # about 6 s: the full models on the meta device, ours and theirs
@pytest.mark.parametrize("which", ["base", "refiner"])
def test_full_size_layout_maps_one_to_one_onto_diffusers_and_transformers(which):
    """The full base (2.6 G UNet params) and refiner on the meta device: every UNet, VAE and text-encoder
    key maps one to one, shapes equal, onto diffusers' / transformers' models of the real configs."""
    config = load_config(BASE if which == "base" else REFINER)
    model = build_model(config, "meta")
    sd = weights_only(model)
    count = lambda p: sum(k.startswith(p) for k in sd)  # noqa: E731
    if which == "base":
        parts = ("model.diffusion_model.", "first_stage_model.", CLIP_L, "conditioner.embedders.1.model.")
        assert [count(p) for p in parts] == [1680, 248, 197, 390]  # 2515 keys, as sd_xl_base_1.0.safetensors
        assert sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model.")) == 2_567_463_684
    else:
        assert (count("first_stage_model."), count("conditioner.embedders.0.model.")) == (248, 390)
    assert len(sd) == sum(count(p) for p in ("model.diffusion_model.", "first_stage_model.", "conditioner."))
    layouts, unet_cfg = diffusers_layout(sd, config)
    assert unet_cfg["addition_embed_type"] == "text_time"
    for part in ("unet", "vae"):
        converted, theirs = layouts[part]
        assert converted == theirs, part
        assert len(converted) == count({"unet": "model.diffusion_model.", "vae": "first_stage_model."}[part])
    prefix = "conditioner.embedders.1.model." if which == "base" else "conditioner.embedders.0.model."
    for name, (converted, theirs) in _text_layouts(sd, prefix).items():
        assert converted == theirs, name


# ----------------------------------------------------------------------------- parity on random weights


def _hf_text_encoders(sd, tmp_path):
    """transformers' CLIPTextModel (ViT-L layout) and CLIPTextModelWithProjection (bigG) at the tiny sizes,
    loaded from our state dict through diffusers' single-file path (configs written locally)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = {}
    if any(k.startswith(CLIP_L) for k in sd):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=CLIP_W, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
        cfg.save_pretrained(tmp_path / "clip_l")
        out["clip"] = create_diffusers_clip_model_from_ldm(CLIPTextModel, sd, config=str(tmp_path / "clip_l"),
                                                           local_files_only=True)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=BIGG_W, intermediate_size=4 * BIGG_W, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=POOLED,
                         eos_token_id=49407, pad_token_id=0)
    cfg.save_pretrained(tmp_path / "big_g")  # diffusers finds the base's or the refiner's bigG by its keys
    out["bigg"] = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, sd,
                                                       config=str(tmp_path / "big_g"), local_files_only=True)
    return {k: m.float().eval() for k, m in out.items()}


PROMPTS = ["a red fox in the snow, (watercolor:1.2)", "", "lighthouse " * 30]


@pytest.mark.parametrize("which", ["base", "refiner"])
@torch.no_grad()
def test_text_encoders_match_transformers(which, tiny_base, tiny_refiner, tmp_path):
    """CLIP-L hidden layer (no final norm), bigG penultimate layer (no ln_final) and bigG pooled
    (ln_final at end-of-text, projected) equal transformers' hidden_states[-2] and text_embeds."""
    _, model = tiny_base if which == "base" else tiny_refiner
    hf = _hf_text_encoders(weights_only(model), tmp_path)
    cond = model.conditioner
    ids = cond.tokenizer(PROMPTS)  # the first text encoder's framing (base: CLIP-L, eos padding; refiner: bigG)
    hidden, pooled = cond.encode_ids(ids)
    assert len(hidden) == len(hf)
    if "clip" in hf:
        ref = hf["clip"](ids, output_hidden_states=True).hidden_states[-2]
        assert rel_err(hidden[0], ref) < 1e-4
    big_ids = cond.pooled_encoder.tokenizer(PROMPTS)  # OpenCLIP framing: zero padding
    assert big_ids[1, 2:].eq(0).all() and ids[1, 2:].eq(49407 if "clip" in hf else 0).all()
    out = hf["bigg"](big_ids, output_hidden_states=True)
    assert rel_err(hidden[-1], out.hidden_states[-2]) < 1e-4
    assert rel_err(pooled, out.text_embeds) < 1e-4
    assert hidden[-1].shape == (3, 77, BIGG_W) and pooled.shape == (3, POOLED)


def _diffusers_unet(config, sd):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    cfg = create_unet_diffusers_config_from_ldm(config, sd)
    # diffusers keys SDXL's text_time embedding on the full context widths (2048, 1280); the tiny one is narrower
    cfg.update(addition_embed_type="text_time", addition_time_embed_dim=TIME_W, class_embed_type=None)
    unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, cfg), strict=True)
    return unet.eval()


@pytest.mark.parametrize("which", ["base", "refiner"])
@torch.no_grad()
def test_unet_and_time_ids_match_diffusers(which, tiny_base, tiny_refiner):
    """y = pooled ++ size embeddings equals diffusers' text_embeds ++ add_time_proj(_get_add_time_ids), and
    the UNet's output equals UNet2DConditionModel's with added_cond_kwargs."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from ldm import conditioning as xl

    config, model = tiny_base if which == "base" else tiny_refiner
    theirs = _diffusers_unet(config, weights_only(model))
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(2, POOLED, generator=g)
    fake = SimpleNamespace(unet=theirs, config=SimpleNamespace(requires_aesthetics_score=True))
    sizes = [((1024, 768), (32, 16), (896, 640)), ((512, 512), (0, 0), (512, 512))]
    ys, time_ids = [], []
    for i, (orig, crop, target) in enumerate(sizes):
        if which == "base":
            ids = StableDiffusionXLPipeline._get_add_time_ids(fake, orig, crop, target, torch.float32, POOLED)
            ours = xl.size_conditioning(model, *target, original_size=orig, crop_coords=crop)
        else:
            score = 7.0 if i == 0 else 6.0
            ids, neg_ids = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
                fake, orig, crop, target, score, 2.5, orig, crop, target, torch.float32, POOLED)
            ours = xl.size_conditioning(model, *target, original_size=orig, crop_coords=crop,
                                        aesthetic_score=None if i else score)
            neg = model.conditioner.vector(pooled[i:i + 1], xl.size_conditioning(
                model, *target, original_size=orig, crop_coords=crop, negative=True))
            neg_ref = torch.cat([pooled[i:i + 1], theirs.add_time_proj(neg_ids.flatten()).reshape(1, -1)], dim=1)
            assert rel_err(neg, neg_ref) < 1e-6
        ys.append(model.conditioner.vector(pooled[i:i + 1], ours))
        time_ids.append(ids)
    y, time_ids = torch.cat(ys), torch.cat(time_ids)
    y_ref = torch.cat([pooled, theirs.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    assert y.shape == (2, model.model.diffusion_model.label_emb[0][0].in_features)
    assert rel_err(y, y_ref) < 1e-6

    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 40])
    context = torch.randn(2, 77, model.model.diffusion_model.context_dim, generator=g)
    ours = model.apply_model(x, t, context, y)
    ref = theirs(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert rel_err(ours, ref) < 1e-4


@torch.no_grad()
def test_vae_decode_matches_diffusers(tiny_base):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config, model = tiny_base
    sd = weights_only(model)
    cfg = create_vae_diffusers_config_from_ldm(config, sd)
    assert cfg["scaling_factor"] == 0.13025
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, cfg), strict=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = vae.eval().decode(z / cfg["scaling_factor"]).sample
    assert rel_err(model.decode_first_stage(z), ref) < 1e-4


@torch.no_grad()
def test_optimized_unet_takes_a_vector_per_context(tiny_base):
    """Guidance hands the fast UNet B latents with 2B contexts and 2B vectors: equal to the reference on
    the latents repeated."""
    from ldm.backends import BackendOptions, deoptimize, fans_out, optimize

    _, model = tiny_base
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    context = torch.randn(2, 77, unet.context_dim, generator=g)
    y = torch.randn(2, unet.label_emb[0][0].in_features, generator=g)
    ref = unet(torch.cat([x, x]), torch.cat([t, t]), context, y)
    try:
        optimize(model, BackendOptions())
        assert fans_out(model)
        fast = model.apply_model(x, t, context, y)
    finally:
        deoptimize(model)
    assert rel_err(fast, ref) < 1e-4


# ----------------------------------------------------------------------------- conditioning in the pipeline


def _pipe(model):
    from ldm.pipeline import Txt2Img

    return Txt2Img(model, "cpu", "full")


@torch.no_grad()
def test_long_prompts_emphasis_and_pooled_from_the_first_chunk(tiny_base):
    _, model = tiny_base
    pipe = _pipe(model)
    long = "a castle on a hill, " * 20  # 120 tokens: two chunks
    (c, pooled), (u, pooled_u) = pipe.conditioning(long, "blurry")
    assert c.shape == u.shape == (1, 154, CLIP_W + BIGG_W) and pooled.shape == (1, POOLED)
    chunks = pipe._tokens(long, True)
    _, pooled_first = model.conditioner.encode_ids(chunks.ids[:1])
    assert torch.allclose(pooled, pooled_first, atol=1e-6)
    plain, _ = pipe.conditioning("a red fox", "")
    weighted, _ = pipe.conditioning("(a red fox:1.0)", "")
    assert torch.equal(plain[0], weighted[0]) and torch.equal(plain[1], weighted[1])
    emph, _ = pipe.conditioning("(a red fox:1.4)", "")
    assert not torch.allclose(emph[0], plain[0])
    # each encoder's part is weighted and mean-restored on its own
    for part in (slice(0, CLIP_W), slice(CLIP_W, None)):
        assert torch.allclose(emph[0][..., part].mean(), plain[0][..., part].mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["base", "refiner"])
@torch.no_grad()
def test_empty_negative_prompt_is_zeros_on_the_base_only(which, tiny_base, tiny_refiner):
    """diffusers' force_zeros_for_empty_prompt: the base's unconditional text (context and pooled) is zero
    for an empty negative prompt, the size part of y is kept; the refiner encodes the empty text and
    tells the negative branch aesthetic score 2.5."""
    from ldm.pipeline import Options
    from ldm.planning import WorkItem

    _, model = tiny_base if which == "base" else tiny_refiner
    pipe = _pipe(model)
    seen = []
    pipe._eps_model = lambda x, t, context, y=None: seen.append((context, y)) or torch.zeros(
        context.shape[0], *x.shape[1:])
    opts = Options(H=64, W=64, scale=5.0)
    for negative in ("", "blurry"):
        seen.clear()
        item = WorkItem(index=0, prompt="a fox", negative_prompt=negative, seed=1)
        pipe.guided_denoiser([item], opts)(torch.zeros(1, 4, 8, 8), torch.tensor([10]))
        (context, y), = seen
        assert context.shape[0] == y.shape[0] == 2
        zero = which == "base" and negative == ""
        assert bool(context[0].eq(0).all()) == zero and bool(y[0, :POOLED].eq(0).all()) == zero
        assert not context[1].eq(0).all()
        if which == "base":
            assert torch.equal(y[0, POOLED:], y[1, POOLED:])
        else:
            assert not torch.equal(y[0, POOLED:], y[1, POOLED:])  # aesthetic score 2.5 vs 6.0
            assert torch.equal(y[0, POOLED:-TIME_W], y[1, POOLED:-TIME_W])


def test_size_option_checks():
    from ldm.conditioning import check_options, parse_pair
    from ldm.pipeline import Options

    assert parse_pair("original_size", "1024,768") == (1024, 768)
    for bad in ("1024", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="--original_size must be two integers"):
            parse_pair("original_size", bad)
    with pytest.raises(ValueError, match="--aesthetic_score must be a finite number"):
        Options(aesthetic_score=float("nan")).validate()
    with pytest.raises(ValueError, match="--crop_coords"):
        check_options(crop_coords=(-1, 0))
    with pytest.raises(ValueError, match="--original_size"):
        check_options(original_size=(0, 10))


# ----------------------------------------------------------------------------- detection and the command line


def test_detection_of_sdxl_files(tiny_files):
    for which, kind in (("base", "sdxl"), ("refiner", "sdxl-refiner")):
        found = detect.choose_config(tiny_files[which][1])
        assert found.kind == kind and found.config == detect.CONFIGS[kind]
        assert detect.resolve_parameterization(None, found) is found  # nothing to evaluate
    for path, kind in ((BASE, "sdxl"), (REFINER, "sdxl-refiner")):
        shapes = {k: tuple(v.shape) for k, v in build_model(path, "meta").state_dict().items()}
        assert detect.family(shapes) == kind


def run_cli(args):
    from ldm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("which", fast_first("base", "refiner"))
def test_cli_writes_images_from_a_float16_sdxl_file(which, tmp_path, monkeypatch):
    """End to end on a random-weight tiny SDXL file written by the bench script (float16, the original layout,
    as the released files), size flags set; --from_png then restores them."""
    from bench.make_checkpoint import random_state_dict

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = tiny_sdxl(which == "refiner")
    config, ckpt = tmp_path / "tiny.yaml", tmp_path / "tiny.safetensors"
    OmegaConf.save(OmegaConf.create(cfg), config)
    sd = random_state_dict(cfg, seed=5, dtype=torch.float16)
    assert not any(k in sd for k in SCHEDULE_BUFFERS) and sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    save_file(sd, str(ckpt))
    extra = ["--aesthetic_score", 7] if which == "refiner" else ["--original_size", "512,512", "--crop_coords", "0,32"]
    code, out, err = run_cli(["--config", config, "--ckpt", ckpt, "--ddim_steps", 2, "--outdir", tmp_path,
                              "--no_safety_checker", "--no_watermark", "--n_samples", 1, "--n_iter", 1,
                              "--H", 64, "--W", 96, "--prompt", "a (lighthouse:1.2)", *extra])
    assert code == 0, err
    image = np.asarray(Image.open(tmp_path / "samples" / "00000.png"))
    assert image.shape == (64, 96, 3) and image.std() > 0
    from ldm.images import read_parameters

    text = read_parameters(tmp_path / "samples" / "00000.png")
    recorded = "Aesthetic score: 7" if which == "refiner" else 'Original size: 512x512, Crop coords: "0,32"'
    assert recorded in text
    # --from_png restores the size conditioning: the same pixels again
    code, out, err = run_cli(["--config", config, "--ckpt", ckpt, "--from_png", tmp_path / "samples" / "00000.png",
                              "--outdir", tmp_path / "again", "--no_safety_checker", "--no_watermark"])
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "samples" / "00000.png")), image)


def test_cli_refuses_bad_size_flags_in_one_line(tmp_path):
    for flag, value, message in (("--original_size", "big", "two integers"), ("--aesthetic_score", "nan", "finite")):
        code, _, err = run_cli(["--ckpt", tmp_path / "none.safetensors", flag, value, "--outdir", tmp_path])
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- --vae and the refiner


@pytest.mark.parametrize("layout", fast_first("bare", "prefixed"))
def test_vae_file_replaces_the_autoencoder(layout, tiny_files, tmp_path):
    """A standalone VAE (bare keys, or a whole-model file's first_stage_model.*) replaces the checkpoint's,
    stored in float16, loaded in the model's float32; SD v1 takes one the same way."""
    from helpers import write_tiny_model

    from ldm.checkpoint import CheckpointError, load_vae

    config, ckpt = tiny_files["base"]
    other = randomize_(build_model(tiny_sdxl(), "cpu"), seed=11).first_stage_model.state_dict()
    prefix = "first_stage_model." if layout == "prefixed" else ""
    path = tmp_path / "vae.safetensors"
    save_file({prefix + k: v.half().contiguous() for k, v in other.items()} | (
        {"model.diffusion_model.out.2.bias": torch.zeros(4)} if prefix else {}), str(path))
    model = load_vae(load_model(load_config(config), ckpt), path)
    for k, v in model.first_stage_model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, other[k].half().float()), k
    v1_config, v1_ckpt = write_tiny_model(tmp_path)  # the v1 tiny autoencoder has the same size
    v1 = load_vae(load_model(load_config(v1_config), v1_ckpt), path)
    assert torch.equal(v1.first_stage_model.decoder.conv_out.weight, other["decoder.conv_out.weight"].half().float())
    diffusers_layout = tmp_path / "diffusers_vae.safetensors"
    save_file({"decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(diffusers_layout))
    with pytest.raises(CheckpointError, match="diffusers' layout"):
        load_vae(model, diffusers_layout)


@pytest.mark.slow
@torch.no_grad()
def test_refiner_takes_over_at_the_switch(tiny_files):
    """--refiner: the base denoises t >= (1 - switch) * 1000, the refiner below, in one sampler run; switch 1
    is the base alone, switch 0 the refiner alone."""
    from ldm.pipeline import Options, Txt2Img
    from ldm.planning import WorkItem

    (base_config, base_ckpt), (ref_config, ref_ckpt) = tiny_files["base"], tiny_files["refiner"]

    def make(switch=None):
        extra = dict(refiner=ref_ckpt, refiner_config=ref_config, refiner_switch=switch) if switch is not None else {}
        return Txt2Img.from_files(base_config, base_ckpt, device="cpu", precision="full", hash_model=False, **extra)

    item = WorkItem(index=0, prompt="a fox", negative_prompt="", seed=5)
    opts = Options(sampler="ddim", steps=6, H=64, W=64, scale=4.0)
    pipe = make(0.5)
    calls = []
    for name, p in (("base", pipe), ("refiner", pipe.refiner[0])):
        eps = p._eps_model
        p._eps_model = lambda x, t, c, y=None, eps=eps, name=name: calls.append((name, int(t[0]))) or eps(x, t, c, y)
    both = pipe.sample([item], opts)
    assert {n for n, t in calls if t >= 500} == {"base"} and {n for n, t in calls if t < 500} == {"refiner"}
    assert len(calls) == 6
    alone = make().sample([item], opts)
    assert torch.equal(make(1.0).sample([item], opts), alone)
    assert not torch.allclose(both, alone)
    refiner_alone = make(0.0)
    assert torch.equal(refiner_alone.sample([item], opts), refiner_alone.refiner[0].sample([item], opts))
    line = pipe.settings(item, opts)
    assert (line["Refiner"], line["Refiner switch at"]) == (ref_ckpt.stem, "0.5")


def test_cli_vae_flag(tiny_files, tmp_path, monkeypatch):
    """--vae changes the decoded image; a VAE file in diffusers' layout is refused in one line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config, ckpt = tiny_files["base"]
    other = randomize_(build_model(tiny_sdxl(), "cpu"), seed=12).first_stage_model.state_dict()
    vae = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(vae))
    bad = tmp_path / "diffusers_vae.safetensors"
    save_file({"decoder.mid_block.resnets.0.conv1.weight": torch.zeros(1)}, str(bad))
    images = []
    for name, extra in (("plain", []), ("vae", ["--vae", vae])):
        code, _, err = run_cli(["--config", config, "--ckpt", ckpt, "--ddim_steps", 1, "--outdir", tmp_path / name,
                                "--no_safety_checker", "--no_watermark", "--n_samples", 1, "--n_iter", 1,
                                "--H", 64, "--W", 64, *extra])
        assert code == 0, err
        images.append(np.asarray(Image.open(tmp_path / name / "samples" / "00000.png")))
    assert not np.array_equal(*images)
    code, _, err = run_cli(["--config", config, "--ckpt", ckpt, "--vae", bad, "--outdir", tmp_path / "bad",
                            "--no_safety_checker", "--n_samples", 1, "--n_iter", 1, "--H", 64, "--W", 64])
    assert code != 0 and "diffusers' layout" in err and len(err.strip().splitlines()) == 1, err


def test_vae_in_the_png_and_restored_by_from_png(tiny_files, tmp_path, monkeypatch):
    """An image made with --vae names it as the web UIs do (VAE hash, VAE); --from_png finds that VAE by
    its hash and re-renders the same pixels; with the file gone, one line names the VAE it needs."""
    from ldm.images import read_parameters

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config, ckpt = tiny_files["base"]
    other = randomize_(build_model(tiny_sdxl(), "cpu"), seed=13).first_stage_model.state_dict()
    vae = tmp_path / "my-vae.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(vae))
    common = ["--no_safety_checker", "--no_watermark", "--config", config, "--ckpt", ckpt]
    code, _, err = run_cli([*common, "--vae", vae, "--ddim_steps", 1, "--n_samples", 1, "--n_iter", 1, "--H", 64,
                            "--W", 64, "--outdir", tmp_path / "a"])
    assert code == 0, err
    png = tmp_path / "a" / "samples" / "00000.png"
    text = read_parameters(png)
    from ldm.hashing import checkpoint_hash

    assert f"VAE hash: {checkpoint_hash(vae)}" in text and "VAE: my-vae.safetensors" in text
    code, _, err = run_cli([*common, "--from_png", png, "--outdir", tmp_path / "b"])
    assert code == 0, err
    again = tmp_path / "b" / "samples" / "00000.png"
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    vae.rename(tmp_path / "elsewhere.bin")
    code, _, err = run_cli([*common, "--from_png", png, "--outdir", tmp_path / "c"])
    assert code == 1 and "my-vae.safetensors" in err and len(err.strip().splitlines()) == 1, err
