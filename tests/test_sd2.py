"""Stable Diffusion 2.x: the OpenCLIP text tower, the v2 configs and key layout, detection, end to end.

The text tower is compared with transformers' CLIPTextModel loaded through diffusers' single-file
converter (`convert_open_clip_checkpoint`), which reads SD 2.x's "penultimate" layer as a 23-layer
CLIP text model with its final layer norm. Random weights throughout; nothing is downloaded.
"""

import contextlib
import inspect
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from helpers import diffusers_layout, randomize_, rel_err, save_checkpoint, tiny_config
from ldm import detect
from ldm.checkpoint import CheckpointError, build_model
from ldm.config import load_config
from ldm.models.diffusion import SCHEDULE_BUFFERS
from ldm.models.open_clip import FrozenOpenCLIPEmbedder
from ldm.models.tokenizer import CLIPTokenizer
from ldm.models.unet import UNetModel

REPO = Path(__file__).resolve().parent.parent
V2_CONFIG = REPO / "configs/stable-diffusion/v2-inference.yaml"
V2V_CONFIG = REPO / "configs/stable-diffusion/v2-inference-v.yaml"
BOS, EOS = 49406, 49407

# The 2.x UNet layout (linear proj_in/proj_out) is the UNet's own option; until that branch is merged,
# tiny 2.x models here use the v1 projection and the full-layout tests are expected to fail.
LINEAR_UNET = "use_linear_in_transformer" in inspect.signature(UNetModel.__init__).parameters
needs_unet = pytest.mark.skipif(not LINEAR_UNET, reason="the UNet lacks use_linear_in_transformer")

TINY_CLIP = dict(width=64, layers=3, heads=4, embed_dim=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_v2_config(parameterization="eps"):
    """The tiny v1 test config turned 2.x: an OpenCLIP text tower (penultimate layer), heads of a
    fixed width, linear projections in the transformers (when the UNet has them)."""
    cfg = tiny_config()
    params = cfg["model"]["params"]
    if parameterization != "eps":
        params["parameterization"] = parameterization
    unet = params["unet_config"]["params"]
    del unet["num_heads"]
    unet.update(num_head_channels=16, context_dim=TINY_CLIP["width"])
    if LINEAR_UNET:
        unet["use_linear_in_transformer"] = True
    params["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": dict(TINY_CLIP, freeze=True, layer="penultimate"),
    }
    return cfg


def write_tiny(folder, cfg, seed=1, name="tiny"):
    config = Path(folder) / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    ckpt = save_checkpoint(randomize_(build_model(cfg, "cpu"), seed=seed), Path(folder) / f"{name}.safetensors")
    return config, Path(ckpt)


# ----------------------------------------------------------------------------- the text tower


def hf_text_model(embedder, n_layers):
    """transformers' CLIPTextModel with `n_layers` layers, loaded from the embedder's weights in the
    checkpoint layout through diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    tower = embedder.model
    width = tower.positional_embedding.shape[1]
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=n_layers, num_attention_heads=tower.transformer.resblocks[0].attn.heads,
        max_position_embeddings=tower.positional_embedding.shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=tower.text_projection.shape[1],
    )
    model = CLIPTextModel(config)
    checkpoint = {"cond_stage_model." + k: v for k, v in embedder.state_dict().items()}
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix="cond_stage_model.model.")
    if not hasattr(model, "text_model"):  # transformers >= 5.6 has no `text_model.` level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    drop = f"encoder.layers.{n_layers}."
    converted = {k: v for k, v in converted.items() if drop not in k}  # the block "penultimate" skips
    model.load_state_dict(converted, strict=True)
    return model.eval()


PROMPTS = ["a photograph of an astronaut riding a horse", "", "(emphasis) [ignored], 1girl, 3 apples"]


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_text_tower_matches_transformers_via_diffusers_converter(layer):
    embedder = randomize_(FrozenOpenCLIPEmbedder(layer=layer, **TINY_CLIP), seed=3).eval()
    n_layers = TINY_CLIP["layers"] - (layer == "penultimate")
    reference = hf_text_model(embedder, n_layers)
    ids = embedder.tokenizer(PROMPTS, max_length=77)
    with torch.no_grad():
        ours = embedder(PROMPTS)
        theirs = reference(ids).last_hidden_state
    assert ours.shape == (3, 77, TINY_CLIP["width"])
    assert rel_err(ours, theirs) < 1e-4


@pytest.mark.slow
def test_full_vit_h_text_tower_matches_transformers():
    """ViT-H/14 at its real size (354M parameters), penultimate layer: 23 CLIP layers + final norm."""
    embedder = randomize_(FrozenOpenCLIPEmbedder(layer="penultimate"), seed=4).eval()
    assert sum(p.numel() for p in embedder.parameters()) == sum(math.prod(s) for s in vit_h_14_keys().values())
    reference = hf_text_model(embedder, 23)  # about 3 GB for both models
    ids = embedder.tokenizer(PROMPTS[:2], max_length=77)
    with torch.no_grad():
        ours = embedder.encode_ids(ids)
        theirs = reference(ids).last_hidden_state
    assert ours.shape == (2, 77, 1024)
    assert rel_err(ours, theirs) < 1e-4


def test_open_clip_pads_with_zero_and_frames_like_clip():
    embedder = FrozenOpenCLIPEmbedder(**TINY_CLIP)
    tok = embedder.tokenizer
    clip = CLIPTokenizer.from_bpe_file()
    text = "A watercolor fox, (red:1.2)"
    ids = tok([text, ""], max_length=77)
    words = clip.encode(text)
    assert ids[0].tolist() == [BOS, *words, EOS] + [0] * (75 - len(words))
    assert ids[1].tolist() == [BOS, EOS] + [0] * 75
    long = tok(["word " * 100], max_length=77)[0].tolist()
    assert len(long) == 77 and long[0] == BOS and long[-1] == EOS and 0 not in long
    assert tok.decode(ids[0], skip_special_tokens=True) == clip.decode(words)


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown arch 'ViT-bigG-99'.*ViT-H-14"):
        FrozenOpenCLIPEmbedder(arch="ViT-bigG-99")
    with pytest.raises(ValueError, match="layer='pooled' is not supported"):
        FrozenOpenCLIPEmbedder(layer="pooled", **TINY_CLIP)


# ----------------------------------------------------------------------------- prompts through the pipeline


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_v2")
    return write_tiny(folder, tiny_v2_config())


def test_long_prompt_emphasis_and_negative_prompt_pad_with_zero(tiny_v2):
    """The pipeline frames 2.x prompts with pad 0: the empty chunk that pads the shorter prompt
    encodes exactly as OpenCLIP's own framing of the empty prompt; emphasis scales as for v1."""
    from ldm.pipeline import Txt2Img

    config, ckpt = tiny_v2
    pipe = Txt2Img.from_files(config, ckpt, device="cpu", precision="full", hash_model=False)
    enc = pipe.model.cond_stage_model
    long_prompt = ", ".join(["a tall red lighthouse on a cliff"] * 12)  # > 75 tokens: two chunks
    cond, uncond = pipe.conditioning(long_prompt, "blurry")
    assert cond.shape == uncond.shape == (1, 154, TINY_CLIP["width"])
    with torch.no_grad():
        empty = enc.encode_ids(enc.tokenizer([""]))  # [BOS, EOS, 0 x 75]
        blurry = enc.encode_ids(enc.tokenizer(["blurry"]))
    torch.testing.assert_close(uncond[0, 77:], empty[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond[0, :77], blurry[0], rtol=0, atol=1e-6)

    plain, _ = pipe.conditioning("red fox", "")
    weighted, _ = pipe.conditioning("(red:1.5) fox", "")
    with torch.no_grad():
        hidden = enc.encode_ids(enc.tokenizer(["red fox"]))[0]
    w = torch.ones(77, 1)
    w[1] = 1.5  # "red" is token 1 after bos
    expected = hidden * w * (hidden.mean() / (hidden * w).mean())
    torch.testing.assert_close(plain[0], hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(weighted[0], expected, rtol=1e-5, atol=1e-6)


def test_file_without_the_unused_text_weights_loads(tiny_v2, tmp_path):
    """2.x files converted back from diffusers' 23-layer text encoder lack the last block, the projection
    and the temperature, which "penultimate" never reads: they load, and encode the same."""
    from ldm.checkpoint import load_model, read_state_dict

    config, ckpt = tiny_v2
    last = f"cond_stage_model.model.transformer.resblocks.{TINY_CLIP['layers'] - 1}."
    sd = {k: v for k, v in read_state_dict(ckpt).items()
          if not k.startswith(last) and not k.endswith(("text_projection", "logit_scale"))}
    assert len(read_state_dict(ckpt)) - len(sd) == 14
    save_file(sd, str(tmp_path / "pruned.safetensors"))
    full, pruned = load_model(config, ckpt), load_model(config, tmp_path / "pruned.safetensors")
    with torch.no_grad():
        a, b = (m.cond_stage_model(["a lighthouse"]) for m in (full, pruned))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cfg = tiny_v2_config()
    cfg["model"]["params"]["cond_stage_config"]["params"]["layer"] = "last"  # now the last block is needed
    with pytest.raises(CheckpointError, match=r"12 missing key\(s\): " + last.replace(".", r"\.")):
        load_model(cfg, tmp_path / "pruned.safetensors")


# ----------------------------------------------------------------------------- configs and key layout


def vit_h_14_keys():
    """The `cond_stage_model.model.*` keys of a real 2.x checkpoint, written down from open_clip's
    ViT-H-14 text config (width 1024, 24 layers, context 77, vocabulary 49408, embedding 1024) and its
    CLIP module without `visual` (attn_mask is a non-persistent buffer, so not in the file)."""
    w, p = 1024, "cond_stage_model.model."
    keys = {p + "token_embedding.weight": (49408, w), p + "positional_embedding": (77, w),
            p + "ln_final.weight": (w,), p + "ln_final.bias": (w,), p + "text_projection": (w, 1024),
            p + "logit_scale": ()}
    for i in range(24):
        b = f"{p}transformer.resblocks.{i}."
        keys.update({
            b + "ln_1.weight": (w,), b + "ln_1.bias": (w,),
            b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
            b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
            b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,),
        })
    return keys


def test_v2_configs_are_stabilitys_and_differ_only_in_parameterization():
    a, b = load_config(V2_CONFIG), load_config(V2V_CONFIG)
    assert b["model"]["params"].pop("parameterization") == "v"
    assert a == b
    cond = a["model"]["params"]["cond_stage_config"]
    assert cond == {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    "params": {"freeze": True, "layer": "penultimate"}}
    unet = a["model"]["params"]["unet_config"]["params"]
    assert (unet["num_head_channels"], unet["use_linear_in_transformer"], unet["context_dim"]) == (64, True, 1024)


def test_text_tower_of_the_v2_config_has_the_checkpoint_layout():
    params = load_config(V2_CONFIG)["model"]["params"]["cond_stage_config"]["params"]
    with torch.device("meta"):
        embedder = FrozenOpenCLIPEmbedder(**params)
    ours = {"cond_stage_model." + k: tuple(v.shape) for k, v in embedder.state_dict().items()}
    assert ours == vit_h_14_keys()
    assert len(ours) == 294
    assert embedder.n_blocks == 23


@needs_unet
def test_v2_model_reproduces_the_v2_1_768_checkpoint_layout():
    """Keys and shapes of the full 2.x model equal those of v2-1_768-ema-pruned.ckpt: the UNet and VAE
    keys map one to one onto diffusers' models of the same config, the text tower is open_clip's
    ViT-H-14 written down above, plus the 12 schedule buffers: 686 + 248 + 294 + 12 = 1240 keys."""
    config = load_config(V2V_CONFIG)
    sd = {k: tuple(v.shape) for k, v in build_model(config, "meta").state_dict().items()}
    count = lambda p: sum(k.startswith(p) for k in sd)  # noqa: E731
    assert (count("model.diffusion_model."), count("first_stage_model."), count("cond_stage_model.")) == (686, 248, 294)
    assert all(k in sd for k in SCHEDULE_BUFFERS)
    assert len(sd) == 1240
    assert {k: v for k, v in sd.items() if k.startswith("cond_stage_model.")} == vit_h_14_keys()
    layouts, _ = diffusers_layout(build_model(config, "meta").state_dict(), config)
    for part, n in (("unet", 686), ("vae", 248)):
        converted, theirs = layouts[part]
        assert len(converted) == n
        assert converted == theirs
    shapes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),  # linear, not 1x1 conv
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 1024),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in shapes.items():
        assert sd[key] == shape, key


def _unet_parity(config, latent, seed=0):
    """Our 2.x UNet (reference, then optimized under guidance) against diffusers' UNet2DConditionModel
    built by its single-file converter from the same weights (linear projections, heads of 64 channels)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    from ldm.backends import BackendOptions, optimize

    torch.manual_seed(seed)
    unet_config = config["model"]["params"]["unet_config"]
    ours = randomize_(build_model({"model": unet_config}, "cpu"), seed).eval().requires_grad_(False)
    sd = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    cfg = create_unet_diffusers_config_from_ldm(config, sd)
    assert cfg["use_linear_projection"] is True
    theirs = UNet2DConditionModel(**cfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, cfg), strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([981.0, 37.5])
    ctx = torch.randn(4, 77, ours.context_dim, generator=g)
    with torch.no_grad():
        want = theirs(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=ctx).sample
        assert rel_err(ours(torch.cat([x, x]), torch.cat([t, t]), ctx), want) < 1e-4
        optimize(ours, BackendOptions(prepack_latent_size=latent))
        assert rel_err(ours(x, t, ctx), want) < 1e-4  # each latent once, under both contexts


def test_v2_unet_matches_diffusers_reduced_width():
    _unet_parity(tiny_v2_config(), latent=16)


@pytest.mark.slow
def test_v2_unet_matches_diffusers_full_size():
    """The full 2.x UNet (865 M parameters, 1024-wide context) at a 16x16 latent."""
    _unet_parity(load_config(V2V_CONFIG), latent=16)


def test_v1_unet_and_vae_map_one_to_one_onto_diffusers():
    """The same converter check on the v1 model, which this branch's UNet builds: proves the check."""
    config = load_config(REPO / "configs/stable-diffusion/v1-inference.yaml")
    layouts, _ = diffusers_layout(build_model(config, "meta").state_dict(), config)
    for part, n in (("unet", 686), ("vae", 248)):
        converted, theirs = layouts[part]
        assert len(converted) == n
        assert converted == theirs


# ----------------------------------------------------------------------------- detection


def _write_shapes(path, shapes, extra=None):
    """A .safetensors file with these keys and shapes (zeros); detection reads only its header."""
    sd = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    save_file({**sd, **(extra or {})}, str(path))
    return path


def test_family_from_keys_of_tiny_files(tmp_path, tiny_v2):
    from helpers import write_tiny_model

    _, v1_ckpt = write_tiny_model(tmp_path)
    assert detect.family(detect.checkpoint_shapes(v1_ckpt)) == "v1"
    assert detect.family(detect.checkpoint_shapes(tiny_v2[1])) == "v2"
    # the same keys in a .ckpt (read lazily, memory-mapped)
    from ldm.checkpoint import read_state_dict

    torch.save({"state_dict": dict(read_state_dict(tiny_v2[1]))}, tmp_path / "v2.ckpt")
    assert detect.family(detect.checkpoint_shapes(tmp_path / "v2.ckpt")) == "v2"
    assert detect.choose_config(tiny_v2[1]).config == "configs/stable-diffusion/v2-inference.yaml"
    assert detect.choose_config(v1_ckpt).config == "configs/stable-diffusion/v1-inference.yaml"


def test_family_of_full_size_layouts_and_refusals(tmp_path):
    """Real-size layouts on the meta device: v1 (CLIP, context 768) and 2.x (OpenCLIP, context 1024);
    inpainting files (and sgm files of no known layout) are refused with the reason."""
    v1 = {k: tuple(v.shape) for k, v in build_model(REPO / "configs/stable-diffusion/v1-inference.yaml",
                                                      "meta").state_dict().items()}
    assert detect.family(v1) == "v1"
    v2 = {k: s for k, s in v1.items() if not k.startswith("cond_stage_model.")}
    v2.update(vit_h_14_keys())
    v2 = {k: (s[0], 1024) if ".attn2.to_k." in k or ".attn2.to_v." in k else s for k, s in v2.items()}
    assert detect.family(v2) == "v2"
    no_text = {k: s for k, s in v2.items() if not k.startswith("cond_stage_model.")}
    assert detect.family(no_text) == "v2"  # a UNet+VAE file: the context width alone says 2.x
    assert detect.family({"first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}) is None
    assert detect.family({"conditioner.embedders.1.model.ln_final.weight": (1280,)}) == "sdxl"  # tests/test_sdxl.py
    with pytest.raises(CheckpointError, match="neither SDXL base nor refiner"):
        detect.family({"conditioner.embedders.2.model.ln_final.weight": (1280,)})
    inpaint = dict(v2, **{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    assert detect.family(inpaint) == "v2-inpainting"  # img2img --mask runs it (tests/test_inpaint_v2.py)
    depth = dict(v2, **{"model.diffusion_model.input_blocks.0.0.weight": (320, 5, 3, 3)})
    with pytest.raises(CheckpointError, match="depth-conditioned checkpoint"):
        detect.family(depth)
    path = _write_shapes(tmp_path / "header.safetensors", {"model.diffusion_model.x.attn2.to_k.weight": (8, 1024)})
    assert detect.checkpoint_shapes(path) == {"model.diffusion_model.x.attn2.to_k.weight": (8, 1024)}


class OracleUNet(torch.nn.Module):
    """The exact denoiser of a known data distribution, returning eps or v: for data x0 ~ N(mu, s^2 I),
    E[x0 | x_t] = mu + s^2 sqrt(a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a); eps and v follow from x_t
    = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0 (s = 0: a single image mu)."""

    def __init__(self, alphas_cumprod, predicts, mu, s):
        super().__init__()
        self.ac, self.predicts, self.mu, self.s2 = alphas_cumprod, predicts, mu, s * s
        self.dtype_anchor = torch.nn.Parameter(torch.zeros(()))  # the model's dtype is read from its UNet's parameters

    def forward(self, x, t, context, y=None):
        a = self.ac[t].view(-1, 1, 1, 1).to(x.dtype)
        x0 = self.mu + self.s2 * a.sqrt() * (x - a.sqrt() * self.mu) / (a * self.s2 + 1 - a)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.predicts == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("data", ["gaussian", "one image", "bright image"])
@pytest.mark.parametrize("predicts", ["eps", "v"])
def test_eps_or_v_decided_by_one_unet_evaluation(predicts, data):
    """The decision on ideal denoisers of three data distributions, each as eps- and as v-model."""
    model = build_model(tiny_v2_config(), "cpu")
    g = torch.Generator().manual_seed(5)
    mu, s = {"gaussian": (torch.zeros(1, 4, 1, 1), 1.0),
             "one image": (torch.randn(1, 4, 32, 32, generator=g), 0.0),
             "bright image": (torch.full((1, 4, 1, 1), 2.5), 0.3)}[data]
    model.model.diffusion_model = OracleUNet(model.alphas_cumprod, predicts, mu, s)
    slope = detect.noise_slope(model)
    assert (slope > 0.9) if predicts == "eps" else (abs(slope) < 0.1), slope
    assert detect.parameterization(model) == predicts
    found = detect.resolve_parameterization(model, detect.Detection("v2", detect.CONFIGS["v2"], "keys"))
    assert model.parameterization == predicts
    assert found.kind == ("v2-v" if predicts == "v" else "v2")
    assert found.config.endswith("v2-inference-v.yaml" if predicts == "v" else "v2-inference.yaml")


def test_parameterization_flag_skips_the_evaluation():
    model = build_model(tiny_v2_config(), "cpu")
    model.model.diffusion_model = None  # any evaluation would fail
    found = detect.resolve_parameterization(model, detect.Detection("v2", detect.CONFIGS["v2"], "keys"), "v")
    assert model.parameterization == "v" and found.kind == "v2-v" and "--parameterization" in found.how
    assert detect.resolve_parameterization(model, None, "eps") is None and model.parameterization == "eps"
    v1 = detect.Detection("v1", detect.CONFIGS["v1"], "keys")
    assert detect.resolve_parameterization(model, v1) is v1  # v1: nothing to decide


# ----------------------------------------------------------------------------- the command line


def run_cli(args):
    from ldm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def cli_args(config, ckpt, outdir, *extra):
    args = ["--ckpt", ckpt, "--ddim_steps", 2, "--outdir", outdir, "--no_safety_checker", "--no_watermark",
            "--n_samples", 1, "--n_iter", 1, *extra]
    return (["--config", config] if config else []) + args


def test_cli_runs_a_tiny_v2_checkpoint(tiny_v2, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config, ckpt = tiny_v2
    code, out, err = run_cli(cli_args(config, ckpt, tmp_path, "--H", 64, "--W", 64, "--prompt",
                                      "(a lighthouse:1.3), " + "storm, " * 60, "--negative_prompt", "blurry",
                                      "--torchscript", "--steps", 2))
    assert code == 0, err
    assert "--torchscript/--ipex: not needed" in err
    image = np.asarray(Image.open(tmp_path / "samples" / "00000.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0


@needs_unet
def test_cli_without_config_loads_a_v2_file_with_the_v2_config(tiny_v2, tmp_path, monkeypatch):
    """Without --config a 2.x file gets the full-size v2 config (too large for this tiny file: the
    loader then says so in one line, and no longer with the "looks like SD 2.x" hint)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, err = run_cli(cli_args(None, tiny_v2[1], tmp_path))
    assert code == 1 and err.count("\n") == 1, err
    assert "does not match the config" in err and "different sizes" in err
    assert "looks like a Stable Diffusion 2.x" not in err


def test_cli_detection_line_and_default_size(tiny_v2, tmp_path, monkeypatch):
    """Auto-detection through the command line, the tiny file standing for a real 2.x one (its config
    in place of the bundled one): one line says what was chosen; a v model defaults to 768x768."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(detect.CONFIGS, "v2", str(tiny_v2[0]))
    code, out, err = run_cli(cli_args(None, tiny_v2[1], tmp_path / "a", "--parameterization", "eps", "--H", 64,
                                      "--W", 64))
    assert code == 0, err
    assert err.count("model: Stable Diffusion 2.x 512-base") == 1 and "eps-prediction from --parameterization" in err
    assert "tiny.yaml" in err

    captured = {}

    def fake_generate(args, pipe, opts, *rest, **kw):
        captured.update(H=opts.H, W=opts.W, parameterization=pipe.model.parameterization)
        return 0

    monkeypatch.setattr("ldm.cli._generate", fake_generate)  # the model loads for real; only sampling is skipped
    code, out, err = run_cli(cli_args(None, tiny_v2[1], tmp_path / "b", "--parameterization", "v"))
    assert code == 0, err
    assert captured == {"H": 768, "W": 768, "parameterization": "v"}
    assert "Stable Diffusion 2.x 768-v" in err
    code, out, err = run_cli(cli_args(None, tiny_v2[1], tmp_path / "c", "--parameterization", "v", "--H", 256))
    assert captured == {"H": 256, "W": 768, "parameterization": "v"}


def test_cli_flags_repeat_and_bf16(tiny_v2, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config, ckpt = tiny_v2
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    code, out, err = run_cli(cli_args(config, ckpt, tmp_path, "--H", 64, "--W", 64, "--from-file",
                                      tmp_path / "prompts.txt", "--repeat", 2, "--n_samples", 4, "--skip_grid"))
    assert code == 0, err
    from ldm.images import read_parameters

    prompts = [read_parameters(tmp_path / "samples" / f"{k:05d}.png").splitlines()[0] for k in range(4)]
    assert prompts == ["a cat", "a cat", "a dog", "a dog"]
    code, out, err = run_cli(cli_args(config, ckpt, tmp_path, "--repeat", 0))
    assert code == 1 and "--repeat must be a positive integer" in err
    code, out, err = run_cli(cli_args(config, ckpt, tmp_path, "--bf16", "--precision", "full"))
    assert code == 1 and "contradict" in err and err.count("\n") == 1
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    code, out, err = run_cli(cli_args(config, ckpt, tmp_path, "--bf16", "--device", "cpu"))
    assert code == 1 and "no bfloat16 support" in err and err.count("\n") == 1


def test_v_model_samples_as_the_eps_model_it_equals(tmp_path):
    """A v-model and the eps-model computed from it (eps = sqrt(a) v + sqrt(1 - a) x_t, written here)
    give the same images: the pipeline reads `parameterization` and converts."""
    from ldm.pipeline import Txt2Img

    config_v, ckpt = write_tiny(tmp_path, tiny_v2_config("v"), name="tiny_v")
    pipe_v = Txt2Img.from_files(config_v, ckpt, device="cpu", precision="full", hash_model=False)
    pipe_eps = Txt2Img.from_files(config_v, ckpt, device="cpu", precision="full", hash_model=False,
                                  parameterization="eps")
    inner, ac = pipe_eps.model.model.diffusion_model, pipe_eps.model.alphas_cumprod

    class EpsFromV(torch.nn.Module):
        downsample_factor = inner.downsample_factor

        def forward(self, x, t, context, y=None):
            # alpha_bar at a possibly fractional t, interpolated in log sigma as the k-diffusion samplers step
            log_sigmas = ((1 - ac) / ac).log() / 2
            lo, w = t.floor().long(), (t - t.floor()).float()
            hi = (lo + 1).clamp(max=len(ac) - 1)
            sigma = ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()
            a = (1 / (1 + sigma**2)).view(-1, 1, 1, 1)
            k = context.shape[0] // x.shape[0]
            xs = x.repeat(k, 1, 1, 1)
            return a.repeat(k, 1, 1, 1).sqrt() * inner(x, t, context) + (1 - a.repeat(k, 1, 1, 1)).sqrt() * xs

    pipe_eps.model.model.diffusion_model = EpsFromV()
    pipe_eps.unet = pipe_eps.model.apply_model
    for sampler in ("ddim", "euler"):
        a = pipe_v("a fox", sampler=sampler, steps=4, H=64, W=64, n_samples=1, n_iter=1, seed=3)[0].image
        b = pipe_eps("a fox", sampler=sampler, steps=4, H=64, W=64, n_samples=1, n_iter=1, seed=3)[0].image
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 1, (sampler, diff.max())
    assert pipe_v.default_size == 768 and pipe_eps.default_size == 512

