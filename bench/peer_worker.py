"""One CPU peer of the benchmark in a process of its own, run by bench/peers.py with the peers'
Python (`--peer-python`, a separate environment: `pip install txt2img[bench-openvino]` or
`[bench-sdcpp]` there). Imports nothing from ldm, so that environment needs only the peer itself.

    python bench/peer_worker.py --tool openvino --model DIR --size 256 --threads 2 step
    python bench/peer_worker.py --tool openvino --model DIR --size 512 --steps 20 image

`step`: loads the tool, prints one JSON line {"ready": true, ...}, then for each line "step" read
from standard input prints {"s": seconds} for one guided step (batch 2 / classifier-free guidance)
as the tool's own pipeline runs it; "quit" ends. `image`: loads the tool and makes one image,
printing {"load_s", "image_s", "rss_peak"}. Tools: openvino (an `optimum-cli export openvino`
folder, fp32, static shapes), sdcpp-f32 and sdcpp-f16 (stable-diffusion.cpp through
stable-diffusion-cpp-python on the original checkpoint, its weights kept in f32 or converted to f16).
"""

import argparse
import json
import os
import sys
import time

PROMPT = "a painting of a virus monster playing guitar"  # bench/run.py's


def say(**kw):
    print(json.dumps(kw), flush=True)


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


# ----------------------------------------------------------------------------- OpenVINO


def ov_config(threads):
    # f32 explicitly: on a CPU with AVX512-BF16 or AMX OpenVINO's default inference precision is bf16
    return {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"}


def ov_primitive_isas(compiled):
    """{kernel ISA: layers} from the compiled model's runtime graph (brgconv_avx512_f32 -> avx512, a
    Subgraph's jit_avx2_f32 -> avx2; "other" for kernels that name none), to show whether a cap took effect,
    and {primitive type: layers} in full under "types"."""
    counts, types = {}, {}
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        kind = rt["primitiveType"].astype(str) if "primitiveType" in rt.keys() else ""
        layer = rt["layerType"].astype(str) if "layerType" in rt.keys() else ""
        if layer in ("Input", "Parameter", "Const", "Constant", "Output", "Result"):
            continue
        types[f"{layer}:{kind}"] = types.get(f"{layer}:{kind}", 0) + 1
        isa = next((isa for isa in ("amx", "avx512", "avx2", "sse42") if isa in kind.lower()), "other")
        counts[isa] = counts.get(isa, 0) + 1
    return {**counts, "types": types}


def openvino_unet(model_dir, size, threads):
    """The exported UNet, reshaped to static shapes for one guided step at `size` and compiled as the
    pipeline compiles it (`OVStableDiffusionPipeline.reshape` + `compile`, same config)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(os.path.join(model_dir, "unet", "openvino_model.xml"))
    lat = size // 8
    shapes = {}
    for inp in model.inputs:
        name = inp.get_any_name()
        rank = inp.get_partial_shape().rank.get_length()
        if name == "sample":
            shapes[name] = [2, 4, lat, lat]
        elif name == "timestep":
            shapes[name] = [2] if rank == 1 else []
        elif name == "encoder_hidden_states":
            shapes[name] = [2, 77, inp.get_partial_shape()[2].get_length()]
        else:
            raise SystemExit(f"peer_worker: unexpected UNet input {name}")
    model.reshape(shapes)
    compiled = core.compile_model(model, "CPU", ov_config(threads))
    return compiled, shapes


def openvino_step(args):
    import numpy as np

    t0 = time.perf_counter()
    compiled, shapes = openvino_unet(args.model, args.size, args.threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    feed = {}
    for name, shape in shapes.items():
        if name == "timestep":
            feed[name] = np.full(shape, 500, dtype=np.int64 if compiled.input(name).get_element_type().is_integral()
                                 else np.float32)
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    request = compiled.create_infer_request()
    import openvino as ov

    say(ready=True, load_s=load_s, openvino=ov.get_version(), kernels=ov_primitive_isas(compiled), rss=peak_rss())
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            request.infer(feed)
            say(s=time.perf_counter() - t0)
        elif line.strip() == "quit":
            return


def openvino_image(args):
    from optimum.intel import OVStableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(args.model, compile=False, ov_config=ov_config(args.threads))
    pipe.reshape(batch_size=1, height=args.size, width=args.size, num_images_per_prompt=1)
    pipe.compile()
    load_s = time.perf_counter() - t0
    rss_ready = peak_rss()
    ends = []

    def step_end(pipe, i, t, kwargs):  # where the time goes: each step's end, from the image's start
        ends.append(round(time.perf_counter() - t0, 3))
        return kwargs

    t0 = time.perf_counter()
    pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
         callback_on_step_end=step_end)
    import openvino as ov

    say(load_s=load_s, image_s=time.perf_counter() - t0, rss_ready=rss_ready, rss_peak=peak_rss(),
        openvino=ov.get_version(), step_ends_s=[ends])


# ----------------------------------------------------------------------------- stable-diffusion.cpp


def sdcpp(args):
    from stable_diffusion_cpp import StableDiffusion

    wtype = args.tool.split("-", 1)[1]  # f32 or f16
    t0 = time.perf_counter()
    sd = StableDiffusion(model_path=args.model, wtype=wtype, n_threads=args.threads, vae_decode_only=True, verbose=False)
    return sd, time.perf_counter() - t0


def sdcpp_generate(sd, args, steps):
    t0 = time.perf_counter()
    sd.generate_image(prompt=PROMPT, width=args.size, height=args.size, sample_steps=steps, cfg_scale=7.5, seed=42)
    return time.perf_counter() - t0


def sdcpp_step(args):
    """A step as the difference of two whole generations, 1 and 1 + k sampling steps, over k (the text
    encoding and the decode cancel out)."""
    sd, load_s = sdcpp(args)
    say(ready=True, load_s=load_s, rss=peak_rss())
    for line in sys.stdin:
        if line.strip() == "step":
            short = sdcpp_generate(sd, args, 1)
            long = sdcpp_generate(sd, args, 1 + args.k)
            say(s=(long - short) / args.k)
        elif line.strip() == "quit":
            return


def sdcpp_image(args):
    sd, load_s = sdcpp(args)
    rss_ready = peak_rss()
    image_s = sdcpp_generate(sd, args, args.steps)
    say(load_s=load_s, image_s=image_s, rss_ready=rss_ready, rss_peak=peak_rss())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["step", "image"])
    ap.add_argument("--tool", required=True, choices=["openvino", "sdcpp-f32", "sdcpp-f16"])
    ap.add_argument("--model", required=True, help="OpenVINO export folder, or the original checkpoint for sd.cpp")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="sampling steps for `image`")
    ap.add_argument("--k", type=int, default=2, help="sd.cpp `step`: the extra steps of the longer generation")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        raise SystemExit(f"peer_worker: {args.model} does not exist")
    if args.tool == "openvino":
        (openvino_step if args.mode == "step" else openvino_image)(args)
    else:
        (sdcpp_step if args.mode == "step" else sdcpp_image)(args)


if __name__ == "__main__":
    main()
