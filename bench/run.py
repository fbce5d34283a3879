"""Benchmarks: our txt2img against diffusers on the same checkpoint, and against the machine's GEMM speed.

    python bench/run.py                      # CPU, float32: 256x256 and 512x512 (15 to 25 min on 2 cores)
    python bench/run.py --device cuda        # GPU, float16: 512x512, 50 steps, batch 1
    python bench/run.py --readme             # also rewrite the results tables of bench/README.md and README.md

Both sides get the same checkpoint (the real v1 architecture with random weights, 4.27 GB in the
original layout, written by make_checkpoint.py on first use), the same dtype, the same number of
threads, SDPA attention and the same work. Per-step, decode and end-to-end timings run in one
process, interleaved ours / diffusers so that load from other processes hits both alike, and
report the minimum over repeats. Loading, the first image and peak memory are measured in a
fresh subprocess per side. Diffusers loads through its own single-file code (`from_single_file`
with the original YAML), builds its pipeline from those parts and gets the same token ids.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.defaults import set_openmp_defaults  # noqa: E402

set_openmp_defaults()  # the txt2img command's OpenMP setting, for both sides (and the subprocesses); before torch loads

import torch  # noqa: E402

from bench.make_checkpoint import DEFAULT_OUT, V1_CONFIG  # noqa: E402

RESULTS = ROOT / "bench/results"
READMES = (ROOT / "bench/README.md", ROOT / "README.md")  # each holds the table between the markers
PROMPT = "a painting of a virus monster playing guitar"
GB = 1e9


# ----------------------------------------------------------------------------- measuring


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns, repeats, device, log=None, warmup=True):
    """{name: [seconds]}: one warm-up call each, then `repeats` rounds calling every fn once in turn."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        if warmup:
            timed(fn, device)
    for r in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
            if log:
                log(f"    {name}: {times[name][-1]:.3f} s")
    return times


def peak_rss():
    """Peak resident set size of this process in bytes (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine(device, threads):
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LDM_ONEDNN", "THP_MEM_ALLOC_ENABLE")
           if k in os.environ}
    info = {"env": env, "python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cores": os.cpu_count(), "os": platform.platform(), "nice": os.nice(0)}
    try:
        import diffusers
        import transformers

        info["diffusers"], info["transformers"] = diffusers.__version__, transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024 / GB, 1)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
    return info


GEMM_SHAPES = {"cpu": [(4096, 4096, 4096), (2048, 2048, 2048), (4096, 1280, 1280)],  # the best of these counts
               "cuda": [(8192, 8192, 8192), (4096, 4096, 4096)]}


def gemm_tflops(device, dtype, repeats=5):
    """The machine's measured GEMM throughput: {kernel: TFLOPS}, each kernel's best over a few (m, k, n)
    shapes (on the CPU, oneDNN runs 2048^3 and 4096 x 1280 x 1280 about 7 % faster than 4096^3)."""
    kind = torch.device(device).type
    best = {}
    for m, k, n in GEMM_SHAPES[kind]:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        bt = b.t().contiguous()
        kernels = {"torch.mm": lambda: torch.mm(a, b)}
        if kind == "cpu":
            from ldm.backends.kernels import onednn_available

            kernels = {"torch.mm (MKL)": kernels["torch.mm"]}
            if onednn_available():
                kernels["oneDNN matmul"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
        with torch.inference_mode():
            times = interleaved(kernels, repeats, device)
        for name, t in times.items():
            best[name] = max(best.get(name, 0.0), 2 * m * k * n / min(t) / 1e12)
    return best


def unet_flops(config, size, ours=False):
    """FLOPs of one guided UNet step at image size `size`, counted on the meta device: as the original
    and diffusers compute it (2 latents, 2 contexts), or with `ours` as our CPU path does: the latent
    passed once and fanned out to its 2 contexts at the first cross-attention, and each upsampling
    convolution done as four 2x2 convolutions on the small map (4/9 of its FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.backends import BackendOptions, optimize
    from ldm.checkpoint import build_model
    from ldm.models.unet import Upsample

    unet = build_model(config, "meta").model.diffusion_model
    if ours:
        optimize(unet, BackendOptions(onednn=False))  # the fan-out; FLOPs are the same whatever the kernels
    upsampling = []
    for m in unet.modules():
        if isinstance(m, Upsample):
            m.register_forward_hook(lambda m, args, out: upsampling.append(2 * out.numel() * m.conv.in_channels * 9))
    latents = 1 if ours else 2
    with torch.device("meta"):
        x = torch.empty(latents, unet.in_channels, size // 8, size // 8)
        t = torch.empty(latents)
        c = torch.empty(2, 77, unet.context_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, c)
    return counter.get_total_flops() - (5 / 9 * sum(upsampling) if ours else 0)


# ----------------------------------------------------------------------------- the two sides


def clip_config_dir():
    """A local copy of CLIP ViT-L/14's text config, which diffusers' single-file loader reads (no download)."""
    from transformers import CLIPTextConfig

    path = RESULTS / "clip-vit-large-patch14-text"
    if not (path / "config.json").is_file():
        CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                       projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1).save_pretrained(path)
    return path


def load_diffusers(ckpt, config, device, dtype):
    """UNet, VAE and CLIP text model through diffusers' own single-file loading of the original checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel

    sd = load_single_file_checkpoint(str(ckpt))
    kw = {"original_config": str(config), "torch_dtype": dtype, "local_files_only": True}
    unet = UNet2DConditionModel.from_single_file(sd, **kw)
    vae = AutoencoderKL.from_single_file(sd, **kw)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, sd, config=str(clip_config_dir()), torch_dtype=dtype,
                                                local_files_only=True)
    del sd
    return unet.to(device).eval(), vae.to(device).eval(), text.to(device).eval()


def diffusers_sharing(model, config):
    """Diffusers' UNet and VAE holding our model's weight tensors (converted by diffusers' own converters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    from ldm.config import model_config

    sd = model.state_dict()
    conf = {"model": model_config(config)}
    ucfg = sfu.create_unet_diffusers_config_from_ldm(conf, sd)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(conf, sd, scaling_factor=model.scale_factor)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, ucfg), strict=True, assign=True)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vcfg), strict=True, assign=True)
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def ours_image_fn(pipe, args):
    """One image end to end through our pipeline: text encoding, DDIM with guidance 7.5, decoding to PIL."""

    def image(seed, steps=None, callback=None):
        return pipe(PROMPT, steps=steps or args.e2e_steps, H=args.e2e_size, W=args.e2e_size, n_samples=1, n_iter=1, seed=seed,
                    scale=7.5, sampler="ddim", callback=callback and (lambda *_: callback()))[0].image

    return image


def diffusers_image_fn(unet, vae, text, args):
    """The same through a diffusers StableDiffusionPipeline made of these parts (same token ids as ours)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.models.tokenizer import load_tokenizer

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tokenizer = load_tokenizer("openai/clip-vit-large-patch14")  # the bundled vocabulary: nothing downloaded
    device = unet.device

    def image(seed, steps=None):
        with torch.no_grad():  # as the pipeline does for a prompt string: each text encoded on its own
            ids = tokenizer([PROMPT, ""]).to(device)
            cond, uncond = text(ids[:1])[0], text(ids[1:])[0]
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps or args.e2e_steps,
                    guidance_scale=7.5, height=args.e2e_size, width=args.e2e_size,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]

    return image


def compile_diffusers(unet):
    """torch.compile diffusers' UNet as its docs advise for speed: "reduce-overhead" (CUDA graphs) on a GPU."""
    mode = "reduce-overhead" if next(unet.parameters()).is_cuda else "default"
    unet.forward = torch.compile(unet.forward, mode=mode, fullgraph=False)
    return unet


def optimized(model, args):
    """Our model through the backend pass as the pipeline makes it (`cuda_graphs`, `compile` as asked)."""
    from ldm.backends import BackendOptions, optimize

    return optimize(model, BackendOptions(cuda_graphs=args.cuda_graphs, compile=args.compile))


def other_graphs(args):
    """The name of the variant of ours that differs from `args.cuda_graphs`."""
    return "ours, no CUDA graphs" if args.cuda_graphs else "ours, CUDA graphs"


def variant(model, fn, **changes):
    """fn run with the optimized model's BackendOptions changed for the call (the levers are read at
    call time; no re-packing). The UNet's step (eager, compiled, CUDA-graphed) is made once for the
    variant and kept with it: a CUDA graph captures the levers as they are while it is captured."""
    mods = [m for m in model.modules() if getattr(m, "backend", None) is not None]
    step = {}

    def run(*a, **k):
        saved = [(m, m.backend, m.__dict__.pop("_runner", None)) for m in mods]
        try:
            for m in mods:
                m.backend = m.backend.replace(**changes)
                if "runner" in step and hasattr(m, "fast_forward"):
                    m._runner = step["runner"]
            out = fn(*a, **k)
            step.update(runner=next((m.__dict__.get("_runner") for m in mods if hasattr(m, "fast_forward")), None))
            return out
        finally:
            for m, backend, runner in saved:
                m.backend = backend
                m.__dict__.pop("_runner", None)
                if runner is not None:
                    m._runner = runner

    return run


def setting(owner, name, value):
    """fn -> fn run with torch's own switch owner.name = value for the call (for a CUDA-graphed fn:
    while it is captured, which is when the setting is read, not when the graph is replayed)."""
    def wrap(fn):
        def run(*a):
            before = getattr(owner, name)
            setattr(owner, name, value)
            try:
                return fn(*a)
            finally:
                setattr(owner, name, before)
        return run
    return wrap


def gpu_levers(model, x, t, c):
    """GPU levers, each a variant of our CUDA-graphed step in a graph of its own: GroupNorm in float16
    without the float32 round trip, channels_last activations (a copy of the UNet), cuDNN's benchmark
    mode while capturing (it picks the convolution algorithms the graph keeps), and all three.
    Returns ({name: step fn}, {name: max |variant - ours| / max |ours|})."""
    import copy

    from ldm.backends.cuda import CUDAGraphs

    unet = model.model.diffusion_model
    unet_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    benchmarked = setting(torch.backends.cudnn, "benchmark", True)

    def no_upcast(fn, m=unet):
        return variant(m, fn, half_groupnorm=True, cuda_graphs=False)

    def channels_last(x, t, c):
        return unet_cl.fast_forward(x.contiguous(memory_format=torch.channels_last), t, c)

    variants = {"ours, GroupNorm in float16": CUDAGraphs(no_upcast(unet.fast_forward)),
                "ours, float16 attention": CUDAGraphs(variant(unet, unet.fast_forward, fp32_attention=False)),
                "ours, channels_last": CUDAGraphs(channels_last),
                "ours, cudnn.benchmark": CUDAGraphs(benchmarked(unet.fast_forward)),
                "ours, all three": CUDAGraphs(benchmarked(no_upcast(channels_last, unet_cl)))}
    ref = model.apply_model(x, t, c).double()
    errs = {name: ((fn(x, t, c).double() - ref).abs().max() / ref.abs().max()).item() for name, fn in variants.items()}
    return {name: (lambda fn=fn: fn(x, t, c)) for name, fn in variants.items()}, errs


# ----------------------------------------------------------------------------- subprocess: load, sampling, memory


def child(args):
    """One side in a fresh process: load time, RSS at ready, end-to-end images, peak memory."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    out = {"side": args.child}
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    if args.child == "ours":
        from ldm.pipeline import Txt2Img

        out["import_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        precision = "full" if dtype == torch.float32 else "half"
        pipe = Txt2Img.from_files(args.config, args.ckpt, device=str(device), precision=precision, hash_model=False,
                                  compile=args.compile, cuda_graphs=args.cuda_graphs)
        sync(device)
        out["load_s"] = time.perf_counter() - t0
        image = ours_image_fn(pipe, args)
    else:
        import diffusers  # noqa: F401

        out["import_s"] = time.perf_counter() - t0
        clip_config_dir()
        t0 = time.perf_counter()
        unet, vae, text = load_diffusers(args.ckpt, args.config, device, dtype)
        sync(device)
        out["load_s"] = time.perf_counter() - t0
        if args.compile:
            compile_diffusers(unet)
        image = diffusers_image_fn(unet, vae, text, args)

    out["rss_ready"] = peak_rss()
    if cuda:
        out["gpu_ready"] = torch.cuda.max_memory_allocated()
        out["gpu_reserved_ready"] = torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
    out["image_s"] = []
    for i in range(args.images):
        if args.child == "ours" and not cuda:  # where the time goes: each step's end, from the image's start
            t0, ends = time.perf_counter(), []
            image(42 + i, callback=lambda: ends.append(time.perf_counter() - t0))
            out["image_s"].append(time.perf_counter() - t0)
            out.setdefault("step_ends_s", []).append([round(e, 3) for e in ends])
        else:
            out["image_s"].append(timed(lambda: image(42 + i), device))
    out["rss_peak"] = peak_rss()
    if cuda:
        out["gpu_peak"] = max(out["gpu_ready"], torch.cuda.max_memory_allocated())
        out["gpu_reserved_peak"] = max(out["gpu_reserved_ready"], torch.cuda.max_memory_reserved())
    print("RESULT " + json.dumps(out), flush=True)


def hires(args):
    """1024x1024 on our side: one guided UNet step at a 128x128 latent and the decode, with peak RSS."""
    from ldm.checkpoint import load_model

    torch.set_num_threads(args.threads)
    model = optimized(load_model(args.config, args.ckpt, args.device, getattr(torch, args.dtype)), args)
    lat = 1024 // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, lat, lat, generator=g).to(args.device, model.dtype)  # fanned out to the 2 contexts
    c = torch.randn(2, 77, model.model.diffusion_model.context_dim, generator=g).to(args.device, model.dtype)
    t = torch.full((1,), 500.0, device=args.device)
    out = {"side": "hires"}
    with torch.no_grad():
        out["step_s"] = timed(lambda: model.apply_model(x, t, c), args.device)
        out["rss_after_step"] = peak_rss()
        out["decode_s"] = timed(lambda: model.decode_first_stage(x[:1]), args.device)
    out["rss_peak"] = peak_rss()
    print("RESULT " + json.dumps(out), flush=True)


def drop_page_cache():
    """Empty the kernel's page cache (root only); False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_child(args, side, log):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--device", args.device, "--dtype",
           args.dtype, "--threads", str(args.threads), "--ckpt", str(args.ckpt), "--config", str(args.config),
           "--e2e-size", str(args.e2e_size), "--e2e-steps", str(args.e2e_steps), "--images", str(args.images)]
    if args.compile:
        cmd.append("--compile")
    if args.cuda_graphs:
        cmd.append("--cuda-graphs")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        log(f"  {side}: FAILED ({proc.returncode})\n" + proc.stderr[-3000:])
        return None
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the benchmark


def run(args, log):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    res = {"command": "python bench/run.py " + " ".join(args.argv), "device": device.type, "dtype": args.dtype,
           "machine": machine(device, args.threads), "load_avg_start": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "ckpt_bytes": args.ckpt.stat().st_size,
           "e2e": {"size": args.e2e_size, "steps": args.e2e_steps, "sampler": "ddim", "scale": 7.5}}
    log(f"machine: {res['machine']}")
    log(f"load average at start: {res['load_avg_start']}")

    res["gemm_tflops"] = gemm_tflops(device, dtype)
    log(f"GEMM throughput: {res['gemm_tflops']}")
    res["flops"] = {str(s): unet_flops(args.config, s) for s in args.sizes}
    res["flops_ours"] = {str(s): unet_flops(args.config, s, ours=True) for s in args.sizes}
    log(f"UNet FLOPs per guided step: { {s: f'{f / 1e12:.3f} T' for s, f in res['flops'].items()} }")

    # 1. loading, sampling, memory: one fresh process per side (before this process holds any weights)
    if not args.skip_e2e:
        cold = args.cold and drop_page_cache()
        if not cold:  # make "warm" mean warm: the whole file in the page cache
            with open(args.ckpt, "rb") as f:
                while f.read(1 << 26):
                    pass
        res["page_cache"] = "cold (dropped before each load)" if cold else "warm (file read just before)"
        res["children"] = {}
        for side in ["ours"] + ([] if args.skip_diffusers else ["diffusers"]):
            if args.cold:
                drop_page_cache()
            log(f"load + {args.images} images ({args.e2e_size}x{args.e2e_size}, {args.e2e_steps} steps): {side} ...")
            r = run_child(args, side, log)
            if r:
                res["children"][side] = r
                log(f"  {side}: load {r['load_s']:.2f} s, RSS at ready {r['rss_ready'] / GB:.2f} GB, images "
                    f"{', '.join(f'{s:.1f}' for s in r['image_s'])} s, peak RSS {r['rss_peak'] / GB:.2f} GB")

    # 2. per-step and decode, interleaved, in this process (diffusers holds our very weight tensors)
    from ldm.checkpoint import load_model

    model = load_model(args.config, args.ckpt, device, dtype)
    unet_d, vae_d = (None, None) if args.skip_diffusers else diffusers_sharing(model, args.config)
    optimized(model, args)
    if args.compile and unet_d is not None:
        compile_diffusers(unet_d)
    ours_fn = model.apply_model
    g = torch.Generator().manual_seed(0)
    res["step_s"], res["decode_s"] = {}, {}
    with torch.no_grad():  # as the pipeline samples: a text context is the same tensor at every step
        for size in args.sizes:
            lat = size // 8
            # a guided step as each pipeline samples: diffusers repeats the latent for its two contexts
            # (unconditional, conditional); ours passes it once and the UNet fans it out to both
            x1 = torch.randn(1, 4, lat, lat, generator=g).to(device, dtype)
            t1 = torch.tensor([500.0], device=device)
            x, t = x1.repeat(2, 1, 1, 1), t1.repeat(2)
            c = torch.randn(2, 77, model.model.diffusion_model.context_dim, generator=g).to(device, dtype)
            fns = {"ours": lambda: ours_fn(x1, t1, c)}
            if unet_d is not None:
                fns["diffusers"] = lambda: unet_d(x, t, encoder_hidden_states=c).sample
            if device.type == "cuda":
                other = variant(model, model.apply_model, cuda_graphs=not args.cuda_graphs)
                fns[other_graphs(args)] = lambda fn=other: fn(x1, t1, c)
            if args.levers and device.type == "cpu":
                for name, lever in (("oneDNN", "onednn"), ("fused attention", "fused_attention"),
                                    ("epilogues", "epilogues"), ("phase upsampling", "phase_upsample"),
                                    ("tiny convs as matmuls", "tiny_conv_gemm"), ("key/value reuse", "kv_reuse")):
                    fns[f"ours, {name} off"] = lambda fn=variant(model, model.apply_model, **{lever: False}): fn(x1, t1, c)
                fns["ours, latent repeated"] = lambda: model.apply_model(x, t, c)
            if args.levers and device.type == "cuda":
                levers, errs = gpu_levers(model, x1, t1, c)
                fns.update(levers)
                res.setdefault("lever_rel_err", {})[str(size)] = errs
                log(f"levers, largest difference from our plain step (relative): {errs}")
            repeats = args.repeats if (size <= 256 or device.type == "cuda") else args.large_repeats
            log(f"UNet step, batch 2, {size}x{size}, {repeats} repeats ...")
            res["step_s"][str(size)] = interleaved(fns, repeats, device, log)

            z = torch.randn(1, 4, lat, lat, generator=g).to(device, dtype)
            fns = {"ours": lambda: model.decode_first_stage(z)}
            if vae_d is not None:
                fns["diffusers"] = lambda: vae_d.decode(z / vae_d.config.scaling_factor).sample
            if args.levers and device.type == "cpu":
                fns["ours, oneDNN off"] = lambda fn=variant(model, model.decode_first_stage, onednn=False): fn(z)
            log(f"VAE decode, {size}x{size} ...")
            res["decode_s"][str(size)] = interleaved(fns, repeats, device, log)
    if not args.skip_e2e:  # end to end, interleaved: both pipelines on the weights already in memory
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel

        from ldm.pipeline import Txt2Img

        precision = "full" if dtype == torch.float32 else "half"
        pipe = Txt2Img(model, device, precision)  # optimized already
        fns = {"ours": ours_image_fn(pipe, args)}
        if device.type == "cuda":
            image = ours_image_fn(pipe, args)
            fns[other_graphs(args)] = variant(model, image, cuda_graphs=not args.cuda_graphs)
        text_d = None
        if unet_d is not None:
            text_d = create_diffusers_clip_model_from_ldm(CLIPTextModel, model.state_dict(), config=str(clip_config_dir()),
                                                          torch_dtype=dtype, local_files_only=True).to(device).eval()
            fns["diffusers"] = diffusers_image_fn(unet_d, vae_d, text_d, args)
        log(f"end to end, {args.e2e_size}x{args.e2e_size}, {args.e2e_steps} DDIM steps, {args.e2e_repeats} rounds ...")
        for f in fns.values():  # first-call costs (tokenizer, kernels for new shapes) out of the timing
            f(0, steps=1)
        seeds = iter(range(1000))
        res["e2e_s"] = interleaved({k: (lambda f=f: f(42 + next(seeds))) for k, f in fns.items()}, args.e2e_repeats,
                                   device, log, warmup=False)
    if device.type == "cuda":
        res["gpu_mem_bench_process"] = torch.cuda.max_memory_allocated()
    fns = text_d = model = unet_d = vae_d = None  # free this process's weights before the 1024x1024 run

    if args.hires:
        log("1024x1024: one guided UNet step (latent 128x128) and the decode ...")
        r = run_child(args, "hires", log)
        if r:
            res["hires"] = r
            log(f"  step {r['step_s']:.1f} s, decode {r['decode_s']:.1f} s, peak RSS {r['rss_peak'] / GB:.2f} GB")
    end = gemm_tflops(device, dtype)  # again at the end: the best of both is the machine's throughput
    log(f"GEMM throughput at the end: {end}")
    res["gemm_tflops"] = {k: max(v, end.get(k, 0.0)) for k, v in res["gemm_tflops"].items()}
    res["load_avg_end"] = os.getloadavg()
    res["nice_end"] = os.nice(0)  # a long job may have been reniced by the machine's scheduler meanwhile
    return res


# ----------------------------------------------------------------------------- the table


def _min(v):
    return min(v) if v else None


def rows(res):
    """[(figure, ours, diffusers)] with values already formatted."""
    out = []
    ch = res.get("children", {})
    o, d = ch.get("ours", {}), ch.get("diffusers", {})
    ck = res["ckpt_bytes"]
    sec = "{:.4f}" if res["device"] == "cuda" else "{:.2f}"  # a GPU step takes milliseconds
    gemm = max(res["gemm_tflops"].values())

    def both(label, key, fmt, scale=1.0):
        a, b = o.get(key), d.get(key)
        out.append((label, None if a is None else a / scale, None if b is None else b / scale, fmt))

    both("load to ready, s (page cache " + res.get("page_cache", "?").split()[0] + ")", "load_s", "{:.2f}")
    both("peak RSS at ready, GB", "rss_ready", "{:.2f}", GB)
    out.append(("  the same, / checkpoint size", o.get("rss_ready", 0) / ck or None, d.get("rss_ready", 0) / ck or None,
                "{:.2f}x"))
    for size, times in res["step_s"].items():
        a, b = _min(times.get("ours", [])), _min(times.get("diffusers", []))
        out.append((f"UNet step, guided (batch 2), {size}x{size}, s", a, b, sec))
        f = res["flops"][size] / 1e12
        out.append((f"  fraction of measured sgemm ({gemm:.2f} TFLOPS; {f:.2f} TFLOP/step)",
                    a and f / a / gemm, b and f / b / gemm, "{:.0%}"))
        fewer = res.get("flops_ours", {}).get(size)
        if fewer:
            out.append((f"  TFLOP a step as computed, {size}x{size} (ours: see \"Fewer FLOPs\" below the table)",
                        fewer / 1e12, f, "{:.3f}"))
        if "ours, oneDNN off" in times:
            out.append((f"  ours with the oneDNN levers off, {size}x{size}, s", _min(times["ours, oneDNN off"]), None,
                        "{:.2f}"))
        for name in times:
            if name.startswith("ours, ") and name != "ours, oneDNN off":
                out.append((f"  {name}, {size}x{size}, s", _min(times[name]), None, sec))
    for size, times in res["decode_s"].items():
        out.append((f"VAE decode, 1 image {size}x{size}, s", _min(times.get("ours", [])),
                    _min(times.get("diffusers", [])), sec))
    e = res["e2e"]
    if res.get("e2e_s"):
        label = f"end-to-end per image, {e['size']}x{e['size']}, {e['steps']} DDIM steps, s"
        digits = "{:.2f}" if res["device"] == "cuda" else "{:.1f}"
        out.append((label, _min(res["e2e_s"].get("ours", [])), _min(res["e2e_s"].get("diffusers", [])), digits))
        for name in res["e2e_s"]:
            if name.startswith("ours, "):
                out.append((f"  {name}, s", _min(res["e2e_s"][name]), None, digits))
    if o.get("image_s") or d.get("image_s"):
        out.append(("  first image after load (fresh process), s", (o.get("image_s") or [None])[0],
                    (d.get("image_s") or [None])[0], "{:.1f}"))
        both("peak RSS, fresh process: load and sampling, GB", "rss_peak", "{:.2f}", GB)
    if o.get("gpu_peak") or d.get("gpu_peak"):
        both("peak GPU memory allocated, fresh process: load and sampling, GB", "gpu_peak", "{:.2f}", GB)
        both("  the same, reserved by PyTorch's allocator, GB", "gpu_reserved_peak", "{:.2f}", GB)
    hi = res.get("hires")
    if hi:
        out.append(("1024x1024, ours: guided UNet step (latent 128x128), s", hi["step_s"], None, "{:.1f}"))
        out.append(("1024x1024, ours: VAE decode, s", hi["decode_s"], None, "{:.1f}"))
        out.append(("1024x1024, ours: peak RSS (load, step, decode), GB", hi["rss_peak"] / GB, None, "{:.2f}"))
    return out


def table(results):
    """Markdown: one column group per device measured (CPU first); a missing device leaves its columns empty."""
    by = {r["device"]: r for r in results}
    cpu, gpu = by.get("cpu"), by.get("cuda")
    header = "| figure | CPU ours | CPU diffusers | ours / diffusers | GPU ours | GPU diffusers | ours / diffusers |"
    lines = [header, "|" + "---|" * 7]

    def fmt(v, f):
        return "" if v is None else f.format(v)

    def ratio(a, b, f):
        if a is None or b is None or not b or "%" in f:
            return ""
        return f"{a / b:.2f}"

    groups = {}
    for dev, r in (("cpu", cpu), ("cuda", gpu)):
        if r:
            for label, a, b, f in rows(r):
                groups.setdefault(label, {})[dev] = (a, b, f)
    for label, cells in groups.items():
        row = [label]
        for dev in ("cpu", "cuda"):
            if dev in cells:
                a, b, f = cells[dev]
                row += [fmt(a, f), fmt(b, f), ratio(a, b, f)]
            else:
                row += ["", "", ""]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for r in (cpu, gpu):
        if not r:
            continue
        m = r["machine"]
        where = m.get("gpu") or m.get("cpu", "?")
        notes.append(f"- {r['device'].upper()} ({r['dtype']}): {where}, {m.get('cores')} cores, {m.get('ram_gb', '?')} GB; "
                     f"torch {m['torch']}, diffusers {m.get('diffusers', '?')}, {m['threads']} threads at nice "
                     f"{m.get('nice', '?')}{'' if r.get('nice_end', m.get('nice')) == m.get('nice') else ' to ' + str(r['nice_end'])}; "
                     f"measured sgemm {', '.join(f'{k} {v:.3f} TFLOPS' for k, v in r['gemm_tflops'].items())}; "
                     f"load average {r['load_avg_start'][0]:.1f} at start, {r['load_avg_end'][0]:.1f} at end; "
                     f"{r['date']}; `{' '.join(f'{k}={v}' for k, v in m.get('env', {}).items())}"
                     f"{' ' if m.get('env') else ''}{r['command']}`")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_readme(results):
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    for readme in READMES:
        text = readme.read_text()
        if start not in text or end not in text:
            raise SystemExit(f"{readme} lacks the {start} / {end} markers")
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        readme.write_text(head + start + "\n" + table(results) + end + tail)


# ----------------------------------------------------------------------------- command line


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_OUT, help="checkpoint (written by make_checkpoint.py if missing)")
    ap.add_argument("--config", type=Path, default=V1_CONFIG)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["float32", "float16"], help="default: float32 on the CPU, float16 on a GPU")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    ap.add_argument("--sizes", help="image sizes for the per-step and decode figures (default 256,512 on the CPU, 512 on a GPU)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per figure")
    ap.add_argument("--large-repeats", type=int, default=2, help="repeats at 512 and above on the CPU")
    ap.add_argument("--e2e-size", type=int, help="image size end to end (default 256 on the CPU, 512 on a GPU)")
    ap.add_argument("--e2e-steps", type=int, help="DDIM steps end to end (default 8 on the CPU, 50 on a GPU)")
    ap.add_argument("--images", type=int, default=1, help="images per fresh process after loading (first-image time, peak RSS)")
    ap.add_argument("--e2e-repeats", type=int, default=2, help="interleaved end-to-end rounds in the benchmark process")
    ap.add_argument("--levers", action="store_true", help="also time ours with the oneDNN kernels turned off")
    ap.add_argument("--hires", action="store_true", help="also run 1024x1024 on our side (a step and the decode)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet of both sides")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="ours replays its UNet from CUDA graphs (pipeline option cuda_graphs=True); the figures "
                         "without them are then the extra rows, and the other way round")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each load (needs root)")
    ap.add_argument("--skip-e2e", action="store_true", help="skip the subprocess load / end-to-end / memory figures")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--readme", action="store_true", help="rewrite the results tables in bench/README.md and README.md")
    ap.add_argument("--name", help="results file bench/results/NAME.json (default: cpu or cuda, which the table shows)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.sizes = [int(s) for s in (args.sizes or ("512" if cuda else "256,512")).split(",")]
    args.e2e_size = args.e2e_size or (512 if cuda else 256)
    args.e2e_steps = args.e2e_steps or (50 if cuda else 8)
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.child == "hires":
        return hires(args)
    if args.child:
        return child(args)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU on this machine")
    if not args.ckpt.is_file():
        from bench.make_checkpoint import main as make

        make(["--out", str(args.ckpt)])
    RESULTS.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    res = run(args, log)
    out = RESULTS / f"{args.name or res['device']}.json"
    out.write_text(json.dumps(res, indent=1))
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")) if p.stem in ("cpu", "cuda")]
    print("\n" + table([res] if args.name else results))
    if args.readme:
        write_readme(results)
        print("wrote the table into " + " and ".join(str(p.relative_to(ROOT)) for p in READMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
