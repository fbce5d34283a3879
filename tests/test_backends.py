"""The backend pass: the optimized model computes what the reference model does, with every lever on
and with each one off; it leaves the state dict alone, packs at optimize time, and follows weight
changes (refresh)."""

import copy
import dataclasses
import math
import pickle
import sys

import pytest
import torch
from torch import nn

from helpers import V1_CONFIG, fast_first, randomize_, rel_err, resident_pages, tiny_config
from ldm import backends
from ldm.backends import BackendOptions, deoptimize, fans_out, optimize, refresh
from ldm.backends import kernels
from ldm.backends import modules as fast
from ldm.backends.kernels import onednn_available
from ldm.checkpoint import build_model
from ldm.config import instantiate, model_config
from ldm.models.unet import UNetModel

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
TOL = 1e-5


def _tiny(seed=3, **unet_params):
    config = tiny_config()
    config["model"]["params"]["unet_config"]["params"].update(unet_params)
    return randomize_(build_model(config, "cpu"), seed).eval()


def _inputs(seed=4, batch=2, latent=16, ctx_dim=64, k=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.tensor([981.0, 37.5, 500.0][:batch])
    c = torch.randn(k * batch, 77, ctx_dim, generator=g)  # unconditional rows first, as guidance passes them
    z = torch.randn(1, 4, latent, latent, generator=g)
    ids = torch.randint(0, 49406, (batch, 77), generator=g)
    return x, t, c, z, ids


def _reference_outputs(model, x, t, c, z, ids):
    k = c.shape[0] // x.shape[0]
    with torch.no_grad():
        return (model.apply_model(x.repeat(k, 1, 1, 1), t.repeat(k), c), model.decode_first_stage(z),
                model.cond_stage_model.encode_ids(ids))


def _outputs(model, x, t, c, z, ids):
    with torch.no_grad():
        eps = [model.apply_model(x, t, c) for _ in range(2)]  # twice: the second call reuses what the first kept
        return eps, model.decode_first_stage(z), model.cond_stage_model.encode_ids(ids)


LEVERS = BackendOptions.LEVERS


# Fast tier: every lever on, and every lever off; each lever off in turn runs in the slow tier.
@pytest.mark.parametrize("off", [None, "all", *(pytest.param(name, marks=pytest.mark.slow) for name in LEVERS)])
def test_optimized_equals_reference_with_each_lever_off(off):
    model = _tiny()
    inputs = _inputs()
    eps_ref, img_ref, text_ref = _reference_outputs(model, *inputs)
    options = BackendOptions.none() if off == "all" else BackendOptions(**({off: False} if off else {}))
    optimize(model, options)
    assert fans_out(model)
    eps, img, text = _outputs(model, *inputs)
    for e in eps:
        assert e.shape == eps_ref.shape
        assert rel_err(e, eps_ref) < TOL
    assert rel_err(img, img_ref) < TOL and rel_err(text, text_ref) < TOL


@needs_onednn
@pytest.mark.parametrize("off", [None, "onednn", "fused_attention", "phase_upsample", "tiny_conv_gemm", "kv_reuse"])
def test_each_lever_takes_its_path(off):
    """With a lever on, its kernel really runs (what it keeps is there); with it off, it does not."""
    model = optimize(_tiny(), BackendOptions(**({off: False} if off else {})))
    unet = model.model.diffusion_model
    x, t, c, *_ = _inputs()
    with torch.no_grad():
        model.apply_model(x, t, c)
    convs = [m for m in unet.modules() if isinstance(m, fast.PackedConv2d)]
    forms = {m._form[1] for m in convs if "_form" in m.__dict__}
    ups = [m for m in unet.modules() if isinstance(m, fast.PhaseUpsample)]
    attn2 = [m for m in unet.modules() if isinstance(m, fast.FastCrossAttention) and "_kv" in m.__dict__]
    fused_graphs = unet.input_blocks[1][1].transformer_blocks[0].attn1.fused
    assert bool(convs) == (off != "onednn")
    if off != "onednn":
        assert ("gemm" in forms) == (off != "tiny_conv_gemm")  # the 2x2 maps of the deepest level
        assert "packed" in forms
        assert all(("_phases" in m.__dict__) == (off != "phase_upsample") for m in ups)
        assert bool(fused_graphs.graphs) == (off != "fused_attention")
    assert bool(attn2) == (off != "kv_reuse")


def test_state_dict_unchanged_and_reversible():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    assert optimize(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert any(isinstance(m, fast.FastUNet) for m in model.modules())
    x, t, c, *_ = _inputs()
    with torch.no_grad():
        model.apply_model(x, t, c)
    assert list(model.state_dict()) == list(before)  # nothing kept by a call lands in the state dict
    deoptimize(model)
    assert [type(m) for m in model.modules()] == classes
    assert not fans_out(model)
    assert not any(k in m.__dict__ for m in model.modules() for k in ("backend", "_form", "_kv", "_phases", "fused"))


@needs_onednn
def test_weights_are_packed_at_optimize_time():
    model = optimize(_tiny(), BackendOptions(pack_max_positions=None))  # every convolution packed
    unet = model.model.diffusion_model
    phase_convs = {id(m.conv) for m in unet.modules() if isinstance(m, fast.PhaseUpsample)}
    convs = [m for m in unet.modules() if isinstance(m, fast.PackedConv2d) and id(m) not in phase_convs]
    assert convs and all(m._form[1] == "packed" for m in convs)
    assert convs[0].hint == (1, 4, 64, 64)  # the hint: one 512x512 image under guidance (before the fan-out)
    assert all("_phases" in m.__dict__ for m in unet.modules() if isinstance(m, fast.PhaseUpsample))
    decoder = model.first_stage_model.decoder
    ups = [m for m in decoder.modules() if isinstance(m, fast.PhaseUpsample)]
    assert ups and all("_phases" in m.__dict__ and "_form" not in m.conv.__dict__ for m in ups)  # phase kernels only
    up_convs = {id(m.conv) for m in ups}
    assert all("_form" in m.__dict__ for m in decoder.modules() if isinstance(m, fast.PackedConv2d) and id(m) not in up_convs)
    lazy = optimize(_tiny(), BackendOptions(prepack_latent_size=None))
    assert not any("_form" in m.__dict__ for m in lazy.modules())


@pytest.mark.parametrize("use_refresh", [True, False])
def test_weight_changes_are_followed(use_refresh):
    """Weights changed in place (as a LoRA merge does): after refresh (or at the next call, which notices)
    the optimized model gives the reference's new result."""
    model, reference = _tiny(), _tiny()
    optimize(model)
    x, t, c, z, ids = _inputs()
    with torch.no_grad():
        model.apply_model(x, t, c)
        kept = model.model.diffusion_model.input_blocks[1][0].in_layers[2].__dict__.get("_form")
        for m in (model, reference):
            unet = m.model.diffusion_model
            unet.input_blocks[1][0].in_layers[2].weight.mul_(-1.5)  # a packed conv
            unet.output_blocks[8][-1].conv.weight.add_(0.05)  # an upsampler's phase kernels
            unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.mul_(0.5)  # cached keys
            unet.middle_block[0].in_layers[2].weight.mul_(2.0)  # a tiny-map conv (matmul form)
        if use_refresh:
            refresh(model)
            new = model.model.diffusion_model.input_blocks[1][0].in_layers[2].__dict__.get("_form")
            assert kept is None or new is not kept
        eps_ref = reference.apply_model(x.repeat(2, 1, 1, 1), t.repeat(2), c)
        assert rel_err(model.apply_model(x, t, c), eps_ref) < TOL


def test_copies_and_pickles_leave_what_was_kept_behind():
    model = optimize(_tiny())
    x, t, c, *_ = _inputs()
    with torch.no_grad():
        want = model.apply_model(x, t, c)
        twin = copy.deepcopy(model)
        again = pickle.loads(pickle.dumps(model.model.diffusion_model))
    assert not any(k in m.__dict__ for m in twin.modules() for k in ("_form", "_kv", "_phases", "fused", "_runner"))
    with torch.no_grad():
        assert rel_err(twin.apply_model(x, t, c), want) < TOL
        assert rel_err(again(x, t, c), want) < TOL


@pytest.mark.parametrize("attention_resolutions", [[4, 2, 1], [4], [16]])  # fan out at the top, lower, in the middle
def test_optimized_unet_fans_latents_out_to_their_contexts(attention_resolutions):
    """The optimized UNet: forward(x, t, context of k*B) equals the reference on x repeated k times,
    wherever the first cross-attention sits; the reference takes one context per latent only."""
    model = _tiny(attention_resolutions=attention_resolutions)
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([981.0, 37.5])
    ctxs = {k: torch.randn(k * 2, 7, 64, generator=g) for k in (1, 2, 3)}
    with torch.no_grad():
        want = {k: unet(x.repeat(k, 1, 1, 1), t.repeat(k), c) for k, c in ctxs.items()}
        with pytest.raises(ValueError, match="2 latents, 2 timesteps and 4 contexts"):
            unet(x, t, ctxs[2])
        optimize(model)
        for k, c in ctxs.items():
            got = unet(x, t, c)
            assert got.shape == (k * 2, 4, 16, 16)
            assert rel_err(got, want[k]) < TOL
        with pytest.raises(ValueError, match="2 latents and 2 timesteps for 3 contexts"):
            unet(x, t, torch.randn(3, 7, 64))


def test_options_from_the_environment():
    assert BackendOptions.from_env({}) == BackendOptions()
    assert BackendOptions.from_env({"LDM_ONEDNN": "0"}) == BackendOptions(onednn=False)
    assert BackendOptions.from_env({"LDM_ONEDNN": "0"}, cuda_graphs=True).cuda_graphs
    none = BackendOptions.none()
    assert not any(getattr(none, name) for name in BackendOptions.LEVERS)
    assert set(BackendOptions.LEVERS) <= {f.name for f in dataclasses.fields(BackendOptions)}


def test_optimize_again_changes_the_options():
    model = optimize(_tiny(), BackendOptions())
    optimize(model, BackendOptions(kv_reuse=False))
    attns = [m for m in model.modules() if isinstance(m, fast.FastCrossAttention)]
    assert attns and all(not m.backend.kv_reuse for m in attns)
    if onednn_available():  # the leaves were swapped again too
        assert not any(type(m) is nn.Linear for m in model.model.diffusion_model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp32", [True, False])
def test_fp32_attention_on_cuda_half(fp32):
    model = _tiny()
    x, t, c, *_ = _inputs()
    with torch.no_grad():
        want = model.apply_model(x.repeat(2, 1, 1, 1), t.repeat(2), c)
        model.to("cuda", torch.float16)
        optimize(model, BackendOptions(fp32_attention=fp32))
        got = model.apply_model(x.cuda().half(), t.cuda(), c.cuda().half()).float().cpu()
    assert rel_err(got, want) < BF16_TOL


# ----------------------------------------------------------------------------- SD 2.x and SDXL module trees


def _v2_unet_params():
    p = dict(model_config(V1_CONFIG)["params"]["unet_config"]["params"])
    p.pop("num_heads")
    p.update(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024, use_fp16=True)
    return p  # configs/stable-diffusion/v2-inference.yaml of Stability-AI/stablediffusion


SDXL_UNET = {  # configs/inference/sd_xl_base.yaml of Stability-AI/generative-models
    "adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
    "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10], "context_dim": 2048,
    "spatial_transformer_attn_type": "softmax-xformers",
}


@pytest.mark.parametrize("name", ["v2", "xl"])
def test_v2_and_xl_configs_build_the_original_key_layout(name):
    """Our UNet built from the original v2 / SDXL UNet configs has the checkpoint layout diffusers' own
    converter for original checkpoints expects (checked on the meta device: no weights)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    if name == "v2":
        node = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": _v2_unet_params()}
        config = {"model": {"params": {"unet_config": node}}}
    else:
        node = {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": SDXL_UNET}
        config = {"model": {"params": {"network_config": node}}}
    key = "model.diffusion_model."
    config["model"]["params"]["first_stage_config"] = model_config(V1_CONFIG)["params"]["first_stage_config"]
    with torch.device("meta"):
        unet = instantiate(node)
    sd = {key + k: v for k, v in unet.state_dict().items()}
    assert isinstance(unet, UNetModel)
    if name == "v2":
        assert sd[key + "input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear, not a 1x1 conv
        assert len(sd) == 686
    else:
        assert sd[key + "label_emb.0.0.weight"].shape == (1280, 2816)
        assert sd[key + "label_emb.0.2.weight"].shape == (1280, 1280)
        assert key + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in sd
        assert sd[key + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
        assert not any(k.startswith(key + "input_blocks.1.1.") for k in sd)  # no attention at the top level
    cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**cfg)
    converted = sfu.convert_ldm_unet_checkpoint(sd, cfg)
    expected = ref.state_dict()
    assert set(converted) == set(expected)
    assert all(tuple(converted[k].shape) == tuple(expected[k].shape) for k in expected)


def _full_v1_unet_and_inputs():
    """The real v1 UNet with random weights, one 32x32 latent, a timestep and two contexts."""
    torch.manual_seed(0)
    unet = instantiate(model_config(V1_CONFIG)["params"]["unet_config"]).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500.0])
    return unet, x, t, torch.randn(2, 77, 768, generator=g)


@pytest.mark.slow
def test_full_v1_unet_optimized_equals_reference():
    """The real v1 UNet (random weights), a 32x32 latent under two contexts: reference (latent repeated)
    against the optimized model (latent given once) with every lever on, then with each lever off in turn."""
    unet, x, t, c = _full_v1_unet_and_inputs()
    with torch.no_grad():
        want = unet(x.repeat(2, 1, 1, 1), t.repeat(2), c)
        optimize(unet, BackendOptions(prepack_latent_size=32))
        got = [unet(x, t, c) for _ in range(2)]  # the second call reuses the cross-attention keys and values
        assert sum(p.numel() for p in unet.parameters()) == 859_520_964
        for eps in got:
            assert rel_err(eps, want) < TOL
        assert backends.is_optimized(unet)
        # each lever off in turn, the others on (optimize again swaps the options in place)
        for lever in LEVERS:
            optimize(unet, BackendOptions(prepack_latent_size=32, **{lever: False}))
            fanned = backends.fans_out(unet)
            eps = unet(x, t, c) if fanned else unet(x.repeat(2, 1, 1, 1), t.repeat(2), c)
            assert rel_err(eps, want) < TOL, lever


@needs_onednn
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page maps")
def test_packing_releases_the_file_pages_of_a_loaded_model(tmp_path):
    """A loaded checkpoint's weights are views of the mapped file: once packed, their pages are let go
    (they come back from the page cache if read), and the values are the file's."""
    from helpers import write_tiny_model
    from ldm.checkpoint import load_model

    config, ckpt = write_tiny_model(tmp_path)
    model = load_model(config, ckpt)
    conv = model.model.diffusion_model.output_blocks[0][0].in_layers[2]  # 128 -> 64 channels, 3x3: 72 pages
    want = conv.weight.clone()
    assert resident_pages(conv.weight)[0] > 0
    optimize(model)
    resident, pages = resident_pages(conv.weight)
    assert conv.file_mapping and pages >= 4 and resident == 0
    assert torch.equal(conv.weight, want)
    big = model.model.diffusion_model.input_blocks[0][0]  # 64x64 map: over pack_max_positions, packed all the same
    assert big.file_mapping and big.hint[2:] == (64, 64) and "_form" in big.__dict__  # (the packed copy replaces it)
    with torch.no_grad():
        x = torch.randn(1, 128, 8, 8)
        assert rel_err(conv(x), torch.nn.functional.conv2d(x.double(), want.double(), conv.bias.double(), padding=1)) < 1e-5


@needs_onednn
def test_packing_for_another_latent_size():
    """Packed for a (height, width) given up front; a size the UNet cannot take leaves packing to the first call."""
    model = optimize(_tiny(), BackendOptions(prepack_latent_size=(32, 16)))
    conv_in = model.model.diffusion_model.input_blocks[0][0]
    assert conv_in.hint == (1, 4, 32, 16) and conv_in._form[0][2] == (1, 4, 32, 16)
    assert model.first_stage_model.decoder.conv_in.hint == (1, 4, 32, 16)
    odd = optimize(_tiny(), BackendOptions(prepack_latent_size=12))  # not a multiple of 8
    assert "_form" not in odd.model.diffusion_model.input_blocks[0][0].__dict__
    x, t, c, *_ = _inputs(latent=8)
    with torch.no_grad():
        assert odd.apply_model(x, t, c).shape == (4, 4, 8, 8)


needs_bf16 = pytest.mark.skipif(not (onednn_available() and kernels.bf16_available()),
                                reason="oneDNN has no bfloat16 on this CPU")
BF16_TOL = 3e-2  # bfloat16 keeps 8 bits of mantissa: 4e-3 relative per rounding


@needs_bf16
def test_bf16_model_takes_the_onednn_path_and_stays_near_float32():
    """bfloat16 weights (as --precision bf16 loads them): the optimized UNet runs oneDNN in bfloat16 (packed
    bfloat16 weights, fused attention graphs) and gives the float32 reference's eps within BF16_TOL; the
    bfloat16 reference (no backend) is as far from float32 as the optimized one."""
    model = _tiny()
    x, t, c, *_ = _inputs()
    with torch.no_grad():
        want = model.apply_model(x.repeat(2, 1, 1, 1), t.repeat(2), c)
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        ref16 = half.apply_model(x.repeat(2, 1, 1, 1).bfloat16(), t.repeat(2), c.bfloat16())
        optimize(half)
        got = [half.apply_model(x.bfloat16(), t, c.bfloat16()) for _ in range(2)]
    unet = half.model.diffusion_model
    forms = [m._form[2] for m in unet.modules() if isinstance(m, fast.PackedConv2d) and "_form" in m.__dict__]
    assert forms and all(f.dtype == torch.bfloat16 for f in forms)
    linears = [m for m in unet.modules() if isinstance(m, fast.OneDNNLinear)]
    assert linears and all(m._bf16[1][0].is_mkldnn for m in linears)  # packed at optimize time
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.fused.graphs
    err_ref16 = rel_err(ref16, want)
    for eps in got:
        assert eps.dtype == torch.bfloat16 and eps.shape == want.shape
        assert rel_err(eps, want) < BF16_TOL
        assert rel_err(eps, want) < 2 * err_ref16 + 1e-3
    assert rel_err(got[0], got[1]) == 0  # the same bits at every call


@needs_bf16
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page maps")
def test_bf16_weights_narrowed_at_load_leave_the_resident_set_once_packed(tmp_path):
    """bfloat16 from a float32 file (--precision bf16): the narrowed weights are views of a scratch file on
    disk, not memory of their own, so once packed (convolutions and Linear layers alike) their pages leave
    the resident set as the float32 file's do. Their values are the file's rounded to bfloat16, and the
    model computes the same bits as one converted into memory."""
    from helpers import write_tiny_model
    from ldm.backends.memory import containing_mapping, private_file_mappings
    from ldm.checkpoint import load_model, read_state_dict

    config, ckpt = write_tiny_model(tmp_path)
    model = load_model(config, ckpt, dtype=torch.bfloat16)
    kept = load_model(config, ckpt, dtype=torch.bfloat16, file_backed=False)
    name = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"  # 256 x 32: 4 pages
    conv_name = "model.diffusion_model.output_blocks.0.0.in_layers.2.weight"  # 64 x 128 x 3 x 3: 36 pages
    sd, file = model.state_dict(), read_state_dict(ckpt)
    mappings = private_file_mappings()
    assert containing_mapping(sd[name], mappings) and not containing_mapping(kept.state_dict()[name], mappings)
    x, t, c, z, _ = _inputs()
    x, c, z = x.bfloat16(), c.bfloat16(), z.bfloat16()
    with torch.no_grad():
        for m in (model, kept):
            optimize(m)
        for key in (name, conv_name):
            resident, pages = resident_pages(sd[key])
            assert pages >= 4 and resident == 0, key
            assert torch.equal(sd[key], file[key].to(torch.bfloat16)) and torch.equal(sd[key], kept.state_dict()[key])
        resident, pages = resident_pages(kept.state_dict()[conv_name])
        assert resident == pages >= 30  # memory of its own stays
        assert torch.equal(model.apply_model(x, t, c), kept.apply_model(x, t, c))
        assert torch.equal(model.decode_first_stage(z), kept.decode_first_stage(z))


def test_bf16_without_cpu_support_takes_the_reference_path(monkeypatch):
    """Where oneDNN lacks bfloat16, a bfloat16 model optimizes to the reference computation (no weight packed;
    the same result up to bfloat16 rounding, the fan-out changing the batch sizes the kernels see)."""
    monkeypatch.setattr(kernels, "_BF16", [False])
    model = _tiny().to(torch.bfloat16)
    x, t, c, *_ = _inputs()
    x, c = x.bfloat16(), c.bfloat16()
    with torch.no_grad():
        want = model.apply_model(x.repeat(2, 1, 1, 1), t.repeat(2), c)
        optimize(model)
        got = model.apply_model(x, t, c)
    assert not any("_form" in m.__dict__ or "_phases" in m.__dict__ for m in model.modules())
    assert rel_err(got, want) < BF16_TOL


@pytest.mark.slow
@needs_bf16
def test_full_v1_unet_in_bf16_stays_near_float32():
    """The real v1 UNet (random weights), a 32x32 latent under two contexts: optimized in bfloat16 against
    the float32 reference, within bfloat16 rounding (bench/micro_step.py --dtype float32 bfloat16 measured
    a max |diff| of 0.018 and a mean of 0.003 on eps of mean |eps| 0.28)."""
    unet, x, t, c = _full_v1_unet_and_inputs()
    with torch.no_grad():
        want = unet(x.repeat(2, 1, 1, 1), t.repeat(2), c)
        unet = optimize(unet.to(torch.bfloat16), BackendOptions(prepack_latent_size=32))
        got = unet(x.bfloat16(), t, c.bfloat16()).float()
    diff = (got - want).abs()
    assert rel_err(got, want) < BF16_TOL
    assert diff.mean().item() < 0.02 * want.abs().mean().item()


@needs_onednn
@pytest.mark.parametrize("limit", fast_first(None, 1024, 0, fast=2))
def test_large_maps_run_on_the_plain_weight(limit):
    """Convolutions with more than `pack_max_positions` output positions keep no packed copy (at optimize
    time or at a call), those within it are packed; the results are the reference's either way."""
    model, reference = _tiny(), _tiny()
    optimize(model, BackendOptions(pack_max_positions=limit))
    phase_convs = {id(m.conv) for m in model.modules() if isinstance(m, fast.PhaseUpsample)}
    convs = [m for m in model.modules() if isinstance(m, fast.PackedConv2d) and id(m) not in phase_convs
             and m.hint is not None]  # the encoder's are packed at their first call
    for m in convs:
        rows = m.hint[0] * math.prod(kernels.conv_output_size(m, m.hint))
        plain = limit is not None and rows > limit and not m._gemm_ok(m.hint)
        assert ("_form" in m.__dict__) == (not plain), (m.hint, limit)
    if limit == 1024:  # the tiny model packed for 512x512: its 64x64 maps plain, its 32x32 ones packed
        assert {m.hint[0] * m.hint[2] * m.hint[3] for m in convs if "_form" not in m.__dict__} >= {4096}
        assert any("_form" in m.__dict__ for m in convs)
    inputs = _inputs(latent=16)
    eps_ref, img_ref, _ = _reference_outputs(reference, *inputs)
    eps, img, _ = _outputs(model, *inputs)
    assert all(rel_err(e, eps_ref) < TOL for e in eps) and rel_err(img, img_ref) < TOL
    decoder_in = model.first_stage_model.decoder.conv_in  # 16x16 latent: 256 positions, within every limit but 0
    assert ("_form" in decoder_in.__dict__) == (limit != 0)
    big = model.first_stage_model.decoder.conv_out  # at 128x128: a packed copy only without a limit
    assert ("_form" in big.__dict__) == (limit is None)


@needs_onednn
def test_a_larger_call_drops_the_packed_copy():
    """A convolution packed for a small map and then called on a map over the limit keeps no packed copy."""
    conv = nn.Conv2d(8, 16, 3, padding=1)
    optimize(conv, BackendOptions(pack_max_positions=100))
    x_small, x_big = torch.randn(1, 8, 10, 10), torch.randn(2, 8, 16, 16)  # 100 positions (over 64: no gemm); 512
    with torch.no_grad():
        conv.pack(x_small.shape)
        assert conv._form[1] == "packed"
        want = torch.nn.functional.conv2d(x_big, conv.weight, conv.bias, padding=1)
        y = conv(x_big)  # NCHW in: channels-last out, as a packed weight's call gives
        assert rel_err(y, want) < TOL and "_form" not in conv.__dict__
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert conv.pack(x_big.shape) is False and "_form" not in conv.__dict__


def _glibc():
    import ctypes

    try:
        return hasattr(ctypes.CDLL(None), "malloc_trim") and sys.platform.startswith("linux")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc_trim")
def test_trim_heap_returns_freed_holes():
    """Blocks freed inside the C heap (below glibc's mmap threshold) stay resident until trimmed: with one
    block in ten kept, free() cannot shrink the heap, and trim_heap hands the other nine back."""
    from ldm.backends.memory import resident_bytes, trim_heap

    trim_heap()
    blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KB each, 192 MB in all, written
    kept = blocks[9::10]
    before = resident_bytes()
    del blocks
    assert before - resident_bytes() < 60e6  # free() kept (most of) the holes
    freed = trim_heap()
    assert freed > 100e6 and len(kept) == 300 and all(bool((t == 1).all()) for t in kept[:5])
    assert trim_heap() < 20e6  # nothing much left to return


@needs_onednn
def test_large_weights_have_a_lower_limit():
    """A weight of 32 MiB or more (SDXL's 1280-channel layers) runs plain above `pack_max_positions_large`
    positions, a smaller one above `pack_max_positions`; a weight viewed in a mapped file is always packed."""
    big, small = nn.Conv2d(1280, 1280, 3, padding=1), nn.Conv2d(320, 320, 3, padding=1)  # 59 MB, 3.7 MB
    for conv in (big, small):
        optimize(conv, BackendOptions())  # defaults: 8192 and 1024
    assert big._plain_ok((2, 1280, 32, 32)) and not big._plain_ok((2, 1280, 16, 16))  # 2048 and 512 positions
    assert not small._plain_ok((2, 320, 32, 32)) and not small._plain_ok((2, 320, 64, 64))  # 2048, 8192
    assert small._plain_ok((1, 320, 128, 128))  # 16384
    big.file_mapping = [(0, 1)]  # as _pack marks a weight that is a view of a mapped file
    assert not big._plain_ok((2, 1280, 32, 32))
