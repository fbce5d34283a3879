"""CPU peers beside ours and diffusers: OpenVINO and stable-diffusion.cpp, and the machine's class.

    python bench/peers.py machine [--cap avx2]           # ISA, cores, measured fp32 FMA bound (bench/fma.c), sgemm
    python bench/peers.py prepare --peer-python P        # once: a diffusers folder, then `optimum-cli export openvino`
    python bench/peers.py step --size 256 --peer-python P [--tools ours,diffusers,openvino] [--cap avx2]
    python bench/peers.py image --tool openvino --peer-python P [--cap avx2]   # a whole 512x512 image, 20 steps
    python bench/peers.py table [--readme]               # the peers table, from bench/results/peers.json

The peers run in subprocesses of their own (bench/peer_worker.py) with the Python of a separate
environment (`--peer-python`: `python -m venv V; V/bin/pip install torch==<ours> -e .[bench-openvino,bench-sdcpp]`),
so that optimum-intel cannot change the transformers and diffusers that our tests pin. `step` loads
ours and diffusers (sharing our weight tensors, as bench/run.py does) in this process and each peer
in its worker, then times one guided step (batch 2 / classifier-free guidance, fp32, the same
threads) round by round: ours, diffusers, each peer, and again; the minimum of the rounds counts.
`image` times a whole image in one fresh process per tool, load included (process start to exit).
`--cap avx2` stands in for an AVX2 machine: oneDNN, MKL and ATen's own kernels are capped to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2, and OpenVINO's
OV_CPU_MAX_ISA=AVX2) for every side, the peers' workers included; whether OpenVINO's CPU plugin honours
the cap is read back from the kernels it compiled (`kernels` in the results). stable-diffusion.cpp's ISA is fixed when it is built.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench/results"
OUT = RESULTS / "peers.json"
README = ROOT / "bench/README.md"
MARKERS = ("<!-- peers:start -->", "<!-- peers:end -->")
# OV_CPU_MAX_ISA: OpenVINO's CPU plugin's own kernels (a debug-caps knob until 2026.x; oneDNN's inside it reads ONEDNN_MAX_CPU_ISA)
CAP_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "OV_CPU_MAX_ISA": "AVX2"}
TOOLS = ("ours", "diffusers", "openvino", "sdcpp-f32", "sdcpp-f16")
PEERS = ("diffusers", "openvino", "sdcpp-f32", "sdcpp-f16")
NAMES = {"ours": "ours", "diffusers": "diffusers", "openvino": "OpenVINO", "sdcpp-f32": "sd.cpp f32",
         "sdcpp-f16": "sd.cpp f16"}
GB = 1e9
ISA_NAMES = {"avx512": "AVX-512", "avx2": "AVX2"}


# ----------------------------------------------------------------------------- pure logic (tested)


def cpu_flags(cpuinfo):
    """The feature flags of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def isa_classes(flags):
    """The x86 classes this benchmark names, in order, that the flags show: AVX2 (with FMA), AVX-512
    (F), AVX512-BF16, AMX (bf16 tiles)."""
    out = []
    if {"avx2", "fma"} <= flags:
        out.append("AVX2")
    if "avx512f" in flags:
        out.append("AVX-512")
    if "avx512_bf16" in flags:
        out.append("AVX512-BF16")
    if {"amx_tile", "amx_bf16"} <= flags:
        out.append("AMX")
    return out


def fp32_isa(flags, cap=None):
    """The widest fp32 FMA instruction set in use: 'avx512' or 'avx2' (None without FMA), at most `cap`."""
    if cap != "avx2" and "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return None


def isa_label(flags, cap=None):
    """How the table names the ISA a figure ran under: 'AVX-512' natively, 'AVX2 cap' when capped."""
    if cap == "avx2":
        return "AVX2 cap" if "avx512f" in flags else "AVX2"
    return {"avx512": "AVX-512", "avx2": "AVX2"}.get(fp32_isa(flags), "no FMA")


def fastest_peer(seconds):
    """(peer, seconds) of the fastest peer in {tool: seconds or None}, ours left out; None if no peer ran."""
    peers = [(s, tool) for tool, s in seconds.items() if tool != "ours" and s is not None]
    if not peers:
        return None
    s, tool = min(peers)
    return tool, s


def row_cells(seconds, ratio=None):
    """A table row's cells after the tools' own: the fastest peer and ours / its time (under 1: ours is faster),
    or `ratio` where given (one interleaved run's, `same_run_ratio`)."""
    best = fastest_peer(seconds)
    if best is None:
        return ["", ""]
    ours = seconds.get("ours")
    if ratio is None and ours is not None:
        ratio = ours / best[1]
    return [NAMES[best[0]], "" if ratio is None else f"{ratio:.2f}"]


def same_run_ratio(runs, seconds):
    """ours / the fastest peer (by `seconds`, the row's cells) within the latest run that timed both, each its
    minimum over that run's interleaved rounds; None when no run timed both."""
    best = fastest_peer(seconds)
    both = [r for r in runs if best and r["tools"].get("ours") and r["tools"].get(best[0])]
    if not both:
        return None
    run = max(both, key=lambda r: r["date"])
    return min(run["tools"]["ours"]) / min(run["tools"][best[0]])


def table(res):
    """Markdown from the peers results: per-step and whole-image rows, natively and under the AVX2 cap."""
    lines = ["| figure | ISA | " + " | ".join(NAMES[t] for t in TOOLS) + " | fastest peer | ours / fastest (one run) |",
             "|" + "---|" * (len(TOOLS) + 4)]
    cmds = []
    for cap in ("native", "avx2"):
        m = res.get("machine", {}).get(cap, {})
        for size, runs in sorted(res.get("step", {}).get(cap, {}).items(), key=lambda kv: int(kv[0])):
            # runs with different sets of tools (keyed by the set): each tool's minimum over the rounds of the
            # latest run that timed it (the code as it is now), and ours / fastest peer within one interleaved run
            secs = {}
            for run in sorted(runs.values(), key=lambda r: r["date"]):
                secs.update({t: min(v) for t, v in run["tools"].items() if v})
            ratio = same_run_ratio(runs.values(), secs)
            cells = [f"{secs[t]:.2f}" if secs.get(t) is not None else "" for t in TOOLS]
            run = max(runs.values(), key=lambda r: r["date"])
            lines.append(f"| guided step (batch 2), {size}x{size}, s | {run['isa']} | " + " | ".join(cells) + " | "
                         + " | ".join(row_cells(secs, ratio)) + " |")
            bound = m.get("fma_gflops", {}).get(str(run.get("threads")))
            if bound and run.get("flops") and secs.get("ours"):
                fr = {t: run["flops"] / s / (bound * 1e9) for t, s in secs.items() if s}
                lines.append(f"|   fraction of the {ISA_NAMES[m['fp32_isa']]} fp32 FMA bound ({bound:.0f} GFLOPS, "
                             f"{run['flops'] / 1e12:.3f} TFLOP a step as the original counts it) | {run['isa']} | "
                             + " | ".join(f"{fr[t]:.0%}" if t in fr else "" for t in TOOLS) + " |  |  |")
            for run in runs.values():
                k = run.get("workers", {}).get("openvino", {}).get("kernels") or {}
                if k.get("types"):
                    mlas = sum(n for t, n in k["types"].items() if "mlas" in t)
                    cmds.append(f"{run['isa']}, {size}x{size}: OpenVINO compiled {k.get('avx512', 0)} kernels named AVX-512, "
                                f"{k.get('avx2', 0)} named AVX2, and {mlas} FullyConnected layers on MLAS (which chooses "
                                "its ISA itself: not shown to be capped)")
                cmds.append(f"{run['isa']}, {size}x{size}, {', '.join(NAMES[t] for t in run['tools'])}: `{run['command']}` "
                            f"({run['date']}, load average {run['load_avg'][0]:.1f} to {run['load_avg'][1]:.1f})")
        images = res.get("image", {}).get(cap, {})
        if images:
            first = next(iter(images.values()))
            size, steps = first["size"], first["steps"]
            secs = {t: images[t]["wall_s"] if t in images else None for t in TOOLS}
            cells = [f"{secs[t]:.0f}" if secs.get(t) is not None else "" for t in TOOLS]
            lines.append(f"| whole {size}x{size} image, {steps} steps, one process (load included), s | "
                         f"{first['isa']} | " + " | ".join(cells) + " | " + " | ".join(row_cells(secs)) + " |")
            rss = [f"{images[t]['rss_peak'] / GB:.1f}" if t in images and images[t].get("rss_peak") else "" for t in TOOLS]
            lines.append(f"|   peak RSS of that process, GB | {first['isa']} | " + " | ".join(rss) + " |  |  |")
            for t, r in images.items():
                cmds.append(f"{r['isa']}, whole image, {NAMES[t]}: `{r['command']}` ({r['date']}, load average "
                            f"{r['load_avg'][0]:.1f} to {r['load_avg'][1]:.1f})")
    notes = []
    for cap in ("native", "avx2"):
        m = res.get("machine", {}).get(cap)
        if not m:
            continue
        fma = ", ".join(f"{k} thread{'s' if k != '1' else ''} {v:.0f}" for k, v in sorted(m["fma_gflops"].items()))
        notes.append(f"- {m['isa']}: {m['cpu']}, {m['cores']} cores, classes {' / '.join(m['classes'])}; fp32 FMA bound "
                     f"({ISA_NAMES[m['fp32_isa']]}, measured by bench/fma.c) {fma} GFLOPS; measured sgemm "
                     + ", ".join(f"{k} {v * 1000:.0f}" for k, v in m["sgemm_tflops"].items())
                     + f" GFLOPS; oneDNN runs `{m.get('onednn_isa', '?')}`; `{m['command']}` ({m['date']})")
    versions = res.get("versions", {})
    if versions:
        notes.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "\n".join(lines) + "\n\n" + "\n".join(notes + ["- " + c for c in cmds]) + "\n"


# ----------------------------------------------------------------------------- results file


def load_results():
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def save(path, value):
    """Set res[path[0]][path[1]]... = value in bench/results/peers.json."""
    res = load_results()
    node = res
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1))


def stamp(args):
    return {"command": "python bench/peers.py " + " ".join(args.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "isa": isa_label(cpu_flags(Path("/proc/cpuinfo").read_text()), args.cap), "threads": args.threads}


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- the machine


def fma_binary():
    """bench/fma.c compiled with gcc into bench/results/ (again when the source is newer)."""
    src, exe = ROOT / "bench/fma.c", RESULTS / "fma"
    if not exe.is_file() or exe.stat().st_mtime < src.stat().st_mtime:
        RESULTS.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["gcc", "-O2", "-fopenmp", "-o", str(exe), str(src)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench/peers.py: gcc failed on bench/fma.c: {proc.stderr.strip().splitlines()[-1:]}")
    return exe


def fma_gflops(isa, threads, seconds=1.0):
    out = subprocess.run([str(fma_binary()), isa, str(threads), str(seconds)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[2])


def onednn_isa():
    """The ISA oneDNN reports for its kernels in a fresh process with this environment (ONEDNN_VERBOSE)."""
    code = ("import torch; a = torch.randn(64, 64); torch.ops.mkldnn._linear_pointwise(a, a, None, 'none', [], '')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "ONEDNN_VERBOSE": "1"})
    m = re.search(r"isa:([^,\n]+)", proc.stdout)
    return m.group(1).strip() if m else None


def machine(args):
    import torch

    from bench.run import gemm_tflops

    torch.set_num_threads(args.threads)
    text = Path("/proc/cpuinfo").read_text()
    flags = cpu_flags(text)
    isa = fp32_isa(flags, args.cap)
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    m = {**stamp(args), "cpu": model, "cores": os.cpu_count(), "classes": isa_classes(flags), "fp32_isa": isa,
         "fma_gflops": {str(t): fma_gflops(isa, t) for t in sorted({1, args.threads})},
         "sgemm_tflops": gemm_tflops("cpu", torch.float32), "onednn_isa": onednn_isa(),
         "aten_isa": torch.backends.cpu.get_cpu_capability()}
    log(json.dumps(m, indent=1))
    save(["machine", cap_key(args)], m)


def cap_key(args):
    return "avx2" if args.cap == "avx2" else "native"


# ----------------------------------------------------------------------------- preparing the peers


def clip_tokenizer(path):
    """Hugging Face's CLIPTokenizer built from the BPE merges shipped in ldm/data (the same ids as ours),
    saved to `path` for the exported pipeline: nothing downloaded."""
    from transformers import CLIPTokenizer

    from ldm.models.tokenizer import build_vocab, read_bpe_merges

    merges = read_bpe_merges()
    tok = CLIPTokenizer(vocab=build_vocab(merges), merges=[tuple(m) for m in merges], model_max_length=77)
    tok.save_pretrained(path)
    return tok


def diffusers_folder(ckpt, config, out):
    """The checkpoint as a diffusers folder, through diffusers' own single-file converters (bench/run.py's
    diffusers_sharing and the local CLIP config; nothing downloaded)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    from bench.run import clip_config_dir, diffusers_sharing
    from ldm.checkpoint import load_model

    model = load_model(config, ckpt, "cpu", torch.float32)
    unet, vae = diffusers_sharing(model, config)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, model.state_dict(), config=str(clip_config_dir()),
                                                torch_dtype=torch.float32, local_files_only=True).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tokenizer = clip_tokenizer(out / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    prefix_text_encoder(out / "text_encoder" / "model.safetensors")


def prefix_text_encoder(path):
    """Recent transformers save CLIPTextModel's weights without the `text_model.` prefix, which the older
    transformers that optimum-intel pins read as missing (and initialise at random): put it back."""
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    if not all(k.startswith("text_model.") for k in sd):
        save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}, path,
                  metadata={"format": "pt"})


def prepare(args):
    from bench.make_checkpoint import V1_CONFIG

    dfolder, ovfolder = args.cache / "sd-v1-random-diffusers", args.cache / "sd-v1-random-openvino"
    if not (dfolder / "model_index.json").is_file():
        log(f"diffusers folder {dfolder} ...")
        diffusers_folder(args.ckpt, V1_CONFIG, dfolder)
    if not (ovfolder / "unet" / "openvino_model.xml").is_file():
        cli = Path(args.peer_python).parent / "optimum-cli"
        cmd = [str(cli), "export", "openvino", "--model", str(dfolder), "--task", "text-to-image",
               "--weight-format", "fp32", str(ovfolder)]
        log("OpenVINO export: " + " ".join(cmd))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        log(f"  {time.perf_counter() - t0:.0f} s")
    log(f"ready: {ovfolder}")


def openvino_folder(args):
    path = args.cache / "sd-v1-random-openvino"
    if not (path / "unet" / "openvino_model.xml").is_file():
        raise SystemExit(f"bench/peers.py: no OpenVINO export at {path}: run `python bench/peers.py prepare` first")
    return path


# ----------------------------------------------------------------------------- timing


class Worker:
    """A peer in its own process (bench/peer_worker.py under --peer-python), one guided step per `step()`."""

    def __init__(self, args, tool, size):
        model = openvino_folder(args) if tool == "openvino" else args.ckpt
        cmd = [args.peer_python, str(ROOT / "bench/peer_worker.py"), "step", "--tool", tool, "--model", str(model),
               "--size", str(size), "--threads", str(args.threads)]
        self.tool = tool
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ready = self.read()

    def read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"bench/peers.py: the {self.tool} worker ended (exit {self.proc.wait()})")

    def step(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()["s"]

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait()


def step(args):
    import torch

    from bench.make_checkpoint import V1_CONFIG
    from bench.run import diffusers_sharing, optimized, timed, unet_flops
    from ldm.checkpoint import load_model

    torch.set_num_threads(args.threads)
    tools = args.tools.split(",")
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise SystemExit(f"bench/peers.py: unknown tools {sorted(unknown)} (choose from {', '.join(TOOLS)})")
    size, lat = args.size, args.size // 8
    res = {**stamp(args), "size": size, "load_avg": [os.getloadavg()[0]], "tools": {}, "workers": {},
           "flops": unet_flops(V1_CONFIG, size)}
    fns = {}
    if "ours" in tools or "diffusers" in tools:
        model = load_model(V1_CONFIG, args.ckpt, "cpu", torch.float32)
        unet_d = diffusers_sharing(model, V1_CONFIG)[0] if "diffusers" in tools else None
        optimized(model, argparse.Namespace(cuda_graphs=False, compile=False))
        g = torch.Generator().manual_seed(0)
        x1, t1 = torch.randn(1, 4, lat, lat, generator=g), torch.tensor([500.0])
        x, t = x1.repeat(2, 1, 1, 1), t1.repeat(2)
        c = torch.randn(2, 77, model.model.diffusion_model.context_dim, generator=g)
        if "ours" in tools:
            fns["ours"] = lambda: timed(lambda: model.apply_model(x1, t1, c), "cpu")
        if unet_d is not None:
            fns["diffusers"] = lambda: timed(lambda: unet_d(x, t, encoder_hidden_states=c).sample, "cpu")
    workers = []
    for tool in tools:
        if tool in ("openvino", "sdcpp-f32", "sdcpp-f16"):
            w = Worker(args, tool, size)
            log(f"{tool} ready: {w.ready}")
            res["workers"][tool] = w.ready
            workers.append(w)
            fns[tool] = w.step
    try:
        with torch.no_grad():
            for name, fn in fns.items():  # warm-up: first-call costs out of the timing
                log(f"  warm-up {name}: {fn():.3f} s")
            res["tools"] = {name: [] for name in fns}
            for r in range(args.repeats):
                for name, fn in fns.items():
                    res["tools"][name].append(fn())
                    log(f"  {name}: {res['tools'][name][-1]:.3f} s")
    finally:
        for w in workers:
            w.close()
    res["load_avg"].append(os.getloadavg()[0])
    log(json.dumps({k: round(min(v), 3) for k, v in res["tools"].items()}))
    save(["step", cap_key(args), str(size), ",".join(tools)], res)


def image(args):
    """A whole image in a fresh process for one tool: process start to exit, load included."""
    tool = args.tool
    if tool in ("ours", "diffusers"):
        cmd = [sys.executable, str(ROOT / "bench/run.py"), "--child", tool, "--threads", str(args.threads),
               "--ckpt", str(args.ckpt), "--e2e-size", str(args.size), "--e2e-steps", str(args.steps), "--images", "1"]
    elif tool in ("openvino", "sdcpp-f32", "sdcpp-f16"):
        model = openvino_folder(args) if tool == "openvino" else args.ckpt
        cmd = [args.peer_python, str(ROOT / "bench/peer_worker.py"), "image", "--tool", tool, "--model", str(model),
               "--size", str(args.size), "--threads", str(args.threads), "--steps", str(args.steps)]
    else:
        raise SystemExit(f"bench/peers.py: unknown tool {tool} (choose from {', '.join(TOOLS)})")
    # the page cache warm for every tool: the file read just before
    with open(args.ckpt, "rb") as f:
        while f.read(1 << 26):
            pass
    res = {**stamp(args), "size": args.size, "steps": args.steps, "load_avg": [os.getloadavg()[0]]}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    res["wall_s"] = time.perf_counter() - t0
    res["load_avg"].append(os.getloadavg()[0])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("RESULT ", "{"))]
    if proc.returncode or not lines:
        raise SystemExit(f"bench/peers.py: {tool} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(lines[-1].removeprefix("RESULT "))
    res.update({k: out[k] for k in ("load_s", "rss_peak") if k in out})
    res["image_s"] = out["image_s"][0] if isinstance(out["image_s"], list) else out["image_s"]
    if out.get("step_ends_s"):  # the image's phases: text and first step, the steady steps, decode and the rest
        ends = out["step_ends_s"][0]
        gaps = sorted(b - a for a, b in zip(ends, ends[1:]))
        res["phases_s"] = {"to_first_step_end": ends[0], "step_median": gaps[len(gaps) // 2] if gaps else None,
                           "after_last_step": round(res["image_s"] - ends[-1], 3), "step_ends": ends}
    log(json.dumps(res))
    save(["image", cap_key(args), tool], res)


def versions(args):
    """The peers' versions in the peer environment, for the table's notes."""
    code = ("import importlib.metadata as m, json; out = {}\n"
            "for p in ('openvino', 'optimum-intel', 'stable-diffusion-cpp-python', 'diffusers', 'transformers', 'torch'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    out = json.loads(subprocess.run([args.peer_python, "-c", code], capture_output=True, text=True, check=True).stdout)
    import diffusers
    import torch

    v = {f"{k} (peers)": val for k, val in out.items() if k not in ("diffusers", "transformers", "torch")}
    v.update({"torch": torch.__version__, "diffusers": diffusers.__version__})
    save(["versions"], v)


def write_table(args):
    text = table(load_results())
    print(text)
    if args.readme:
        body = README.read_text()
        start, end = MARKERS
        if start not in body or end not in body:
            raise SystemExit(f"{README} lacks the {start} / {end} markers")
        head, rest = body.split(start, 1)
        README.write_text(head + start + "\n" + text + end + rest.split(end, 1)[1])
        log(f"wrote the peers table into {README.relative_to(ROOT)}")


# ----------------------------------------------------------------------------- command line


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["machine", "prepare", "step", "image", "versions", "table"])
    ap.add_argument("--ckpt", type=Path, default=None, help="the v1 checkpoint (default: bench/make_checkpoint.py's)")
    ap.add_argument("--peer-python", default=os.environ.get("TXT2IMG_PEER_PYTHON", sys.executable),
                    help="the Python of the peers' environment (default: $TXT2IMG_PEER_PYTHON, else this one)")
    ap.add_argument("--cache", type=Path, default=RESULTS, help="where the converted models are kept")
    ap.add_argument("--cap", choices=["avx2"], help="cap every side to AVX2 (stands in for an AVX2 machine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="`image`: sampling steps")
    ap.add_argument("--repeats", type=int, default=3, help="`step`: timed rounds")
    ap.add_argument("--tools", default="ours,diffusers,openvino", help="`step`: comma-separated, of " + ", ".join(TOOLS))
    ap.add_argument("--tool", default="ours", help="`image`: one of " + ", ".join(TOOLS))
    ap.add_argument("--readme", action="store_true", help="`table`: also write it into bench/README.md")
    args = ap.parse_args(argv)
    args.argv = list(argv)
    if args.ckpt is None:
        from bench.make_checkpoint import DEFAULT_OUT

        args.ckpt = DEFAULT_OUT
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.cap == "avx2" and any(os.environ.get(k) != v for k, v in CAP_ENV.items()):
        # the caps are read when the libraries load: start again with them set (the workers inherit them)
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], {**os.environ, **CAP_ENV})
    if args.what != "table":
        from ldm.defaults import set_openmp_defaults

        set_openmp_defaults()  # the txt2img command's OpenMP setting, for every side (the workers inherit it)
    {"machine": machine, "prepare": prepare, "step": step, "image": image, "versions": versions,
     "table": write_table}[args.what](args)
    return 0


sys.path.insert(0, str(ROOT))

if __name__ == "__main__":
    sys.exit(main())
