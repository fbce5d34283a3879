"""End-to-end runs of the `txt2img` command line on a small random-weight checkpoint.

Most runs call `ldm.cli.main` in-process (fast); a few go through `python scripts/txt2img.py`
(and the `txt2img` console script when installed) to check exit codes and one-line errors.
Images are 64x64 (8x8 latents) with 2-4 steps.
"""

import contextlib
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from helpers import V1_CONFIG, randomize_, save_checkpoint, tiny_config
from ldm import images as imagelib
from ldm.checkpoint import build_model
from ldm.cli import main

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "txt2img.py"
PROMPT = "a red fox"
NOVELAI_PROMPT = ("{{alice}}, alice in wonderland, {{{solo}}},1girl,{{delicate face}},blunt_bangs,{floating hair}, "
                  "white hair bow, {forest}, flowering hedge, {{absurdres}}, {best quality},{masterpiece}")
NOVELAI_NEGATIVE = "lowres, worst quality, low quality, blurry, bad anatomy, extra fingers, mutated hands"


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The TINY config as YAML and a random-weight checkpoint of it."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config()
    OmegaConf.save(OmegaConf.create(cfg), d / "tiny.yaml")
    ckpt = save_checkpoint(randomize_(build_model(cfg, "cpu"), seed=1), d / "tiny.safetensors")
    return SimpleNamespace(config=d / "tiny.yaml", ckpt=Path(ckpt),
                           hash=hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()[:10])


@pytest.fixture(scope="session")
def safety_dirs(tmp_path_factory):
    """Random-weight StableDiffusionSafetyChecker folders: one that flags every image, one that flags none."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    from ldm.safety import _image_processor_class, _quiet_hf

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=tower, vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    dirs = {}
    for name, threshold in (("flags_all", -10.0), ("flags_none", 1.0)):
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():  # score = cosine - threshold > 0 flags; cosines lie in [-1, 1]
            checker.concept_embeds_weights.fill_(threshold)
            checker.special_care_embeds_weights.fill_(threshold)
        d = tmp_path_factory.mktemp(name)
        with _quiet_hf():
            checker.save_pretrained(d)
            _image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads spinning at their
    barriers make each model call up to 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the run; the model-hash cache goes to a temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("txt2img tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def base_args(tiny, outdir, *extra, steps=3):
    return ["--config", str(tiny.config), "--ckpt", str(tiny.ckpt), "--H", "64", "--W", "64",
            "--ddim_steps", str(steps), "--outdir", str(outdir), "--no_safety_checker", *map(str, extra)]


def run(args):
    """main(args) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_ok(args):
    code, out, err = run(args)
    assert code == 0, err
    return out, err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def params(path):
    return imagelib.read_parameters(path)


def names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def run_script(args, env=None, cmd=None):
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run((cmd or [sys.executable, str(SCRIPT)]) + [str(a) for a in args], capture_output=True,
                          text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    """--n_samples 2 --n_iter 2 --seed 10: four images, one grid."""
    outdir = tmp_path_factory.mktemp("first") / "out"
    args = base_args(tiny, outdir, "--prompt", PROMPT, "--negative_prompt", "blurry", "--n_samples", 2,
                     "--n_iter", 2, "--seed", 10)
    out, err = run_ok(args)
    return SimpleNamespace(outdir=outdir, args=args, out=out, err=err)


# ----------------------------------------------------------------------------- a plain run


def test_files_numbering_grid_and_messages(first_run, tiny):
    samples = first_run.outdir / "samples"
    assert names(samples) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert names(first_run.outdir) == ["grid-0000.png", "samples"]
    grid = Image.open(first_run.outdir / "grid-0000.png")
    assert grid.size == (2 * 66 + 2, 2 * 66 + 2)  # n_rows = n_samples = 2, 2-pixel padding
    g = np.asarray(grid.convert("RGB"))
    for k in range(4):  # the grid holds the samples in order
        r, c = divmod(k, 2)
        assert np.array_equal(g[2 + 66 * r : 66 * r + 66, 2 + 66 * c : 66 * c + 66], pixels(samples / f"{k:05d}.png"))
    images = [pixels(samples / f"{k:05d}.png") for k in range(4)]
    assert all(img.shape == (64, 64, 3) and img.std() > 5 for img in images)
    assert not np.array_equal(images[0], images[1])  # different seeds, different images
    assert f"4 sample(s) in {samples}" in first_run.out and "grid-0000.png" in first_run.out and "s/step" in first_run.out
    # 64x64 is below the watermark library's minimum: one notice per run, no crash
    assert first_run.err.count("without the invisible watermark") == 1


def test_png_metadata_is_the_webui_parameters_text(first_run, tiny):
    for k in range(4):
        assert params(first_run.outdir / "samples" / f"{k:05d}.png") == (
            f"{PROMPT}\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: {10 + k}, "
            f"Size: 64x64, Model hash: {tiny.hash}, Model: tiny"
        )


def test_next_run_numbers_after_existing_files(first_run, tiny, tmp_path):
    outdir = tmp_path / "out"
    shutil.copytree(first_run.outdir, outdir)
    run_ok(base_args(tiny, outdir, "--n_samples", 1, "--n_iter", 2, "--seed", 3, steps=2))
    assert names(outdir / "samples") == [f"{k:05d}.png" for k in range(6)]
    assert names(outdir) == ["grid-0000.png", "grid-0001.png", "samples"]
    assert Image.open(outdir / "grid-0001.png").size == (66 + 2, 2 * 66 + 2)  # 1 per row
    assert "Seed: 4," in params(outdir / "samples" / "00005.png")
    for k in range(4):  # nothing overwritten
        assert (outdir / "samples" / f"{k:05d}.png").read_bytes() == (first_run.outdir / "samples" / f"{k:05d}.png").read_bytes()


# ----------------------------------------------------------------------------- reproducibility


def test_single_image_regenerated_by_seed_plus_k(first_run, tiny, tmp_path):
    run_ok(base_args(tiny, tmp_path, "--prompt", PROMPT, "--negative_prompt", "blurry", "--seed", 13,
                     "--n_samples", 1, "--n_iter", 1))
    again = tmp_path / "samples" / "00000.png"
    assert np.array_equal(pixels(again), pixels(first_run.outdir / "samples" / "00003.png"))
    assert params(again) == params(first_run.outdir / "samples" / "00003.png")


@pytest.mark.parametrize("extra", [[], ["--cuda_graphs"]], ids=["same flags", "--cuda_graphs, a no-op off CUDA"])
def test_same_flags_same_seed_give_byte_identical_pngs(first_run, tmp_path, extra):
    args = list(first_run.args) + extra
    args[args.index("--outdir") + 1] = str(tmp_path)
    run_ok(args)
    for name in ["grid-0000.png"] + [f"samples/{k:05d}.png" for k in range(4)]:
        assert (tmp_path / name).read_bytes() == (first_run.outdir / name).read_bytes(), name


def test_from_png_reruns_an_image(first_run, tiny, tmp_path):
    source = first_run.outdir / "samples" / "00002.png"
    run_ok(["--config", tiny.config, "--ckpt", tiny.ckpt, "--outdir", tmp_path, "--no_safety_checker",
            "--from_png", source])
    assert names(tmp_path / "samples") == ["00000.png"]  # --n_samples 1 --n_iter 1 unless given
    again = tmp_path / "samples" / "00000.png"
    assert np.array_equal(pixels(again), pixels(source))
    assert params(again) == params(source)


def test_stochastic_sampler_step_noise_follows_the_image_seed(tiny, tmp_path):
    run_ok(base_args(tiny, tmp_path / "a", "--sampler", "euler_a", "--n_samples", 2, "--n_iter", 1, "--seed", 5))
    run_ok(base_args(tiny, tmp_path / "b", "--sampler", "euler_a", "--n_samples", 1, "--n_iter", 1, "--seed", 6))
    run_ok(base_args(tiny, tmp_path / "c", "--sampler", "euler", "--n_samples", 1, "--n_iter", 1, "--seed", 6))
    regenerated = pixels(tmp_path / "b" / "samples" / "00000.png")
    assert np.array_equal(regenerated, pixels(tmp_path / "a" / "samples" / "00001.png"))
    assert not np.array_equal(regenerated, pixels(tmp_path / "c" / "samples" / "00000.png"))  # the noise mattered
    assert "Sampler: Euler a, " in params(tmp_path / "a" / "samples" / "00001.png")


# ----------------------------------------------------------------------------- prompts


def test_from_file_partial_batch_negative_prompts_fixed_code_and_plms(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a blue house\n\n  \nune forêt la nuit, 森 --negative_prompt fog, rain\n{PROMPT}\n",
                       encoding="utf-8")
    out, _ = run_ok(base_args(tiny, tmp_path / "out", "--from-file", prompts, "--n_samples", 2, "--n_iter", 2,
                              "--seed", 7, "--fixed_code", "--plms", "--negative_prompt", "ugly", steps=2))
    samples = tmp_path / "out" / "samples"
    assert names(samples) == [f"{k:05d}.png" for k in range(6)]
    texts = [params(samples / f"{k:05d}.png") for k in range(6)]
    expected = [("a blue house", "ugly", 7), ("une forêt la nuit, 森", "fog, rain", 8), (PROMPT, "ugly", 7)] * 2
    for text, (prompt, negative, seed) in zip(texts, expected):
        assert text.startswith(f"{prompt}\nNegative prompt: {negative}\nSteps: 2, Sampler: PLMS, ")
        assert f"Seed: {seed}," in text
    # --fixed_code: the second iteration starts from the first batch's codes, so it repeats the first
    for k in range(3):
        assert np.array_equal(pixels(samples / f"{k:05d}.png"), pixels(samples / f"{k + 3:05d}.png"))
    assert Image.open(tmp_path / "out" / "grid-0000.png").size == (2 * 66 + 2, 3 * 66 + 2)


def test_emphasis_long_prompts_and_the_issue_prompt(tiny, tmp_path):
    common = ["--n_samples", 1, "--n_iter", 1, "--seed", 1, "--negative_prompt", NOVELAI_NEGATIVE]
    run_ok(base_args(tiny, tmp_path / "a", "--prompt", NOVELAI_PROMPT, *common, steps=2))
    run_ok(base_args(tiny, tmp_path / "b", "--prompt", NOVELAI_PROMPT, "--no_emphasis", *common, steps=2))
    a, b = tmp_path / "a" / "samples" / "00000.png", tmp_path / "b" / "samples" / "00000.png"
    assert params(a).startswith(f"{NOVELAI_PROMPT}\nNegative prompt: {NOVELAI_NEGATIVE}\nSteps: 2,")
    assert params(b).endswith(", Emphasis: None")
    assert not np.array_equal(pixels(a), pixels(b))  # the braces weigh the tokens

    long_prompt = ", ".join(["a red cat"] * 30)  # 119 tokens: two chunks
    _, err = run_ok(base_args(tiny, tmp_path / "c", "--prompt", long_prompt, "--n_samples", 1, "--n_iter", 1, steps=2))
    assert "prompt of 119 tokens is longer than 75: encoded in 2 chunks" in err
    assert params(tmp_path / "c" / "samples" / "00000.png").startswith(long_prompt + "\n")


def test_save_intermediates(tiny, tmp_path):
    run_ok(base_args(tiny, tmp_path, "--n_samples", 1, "--n_iter", 1, "--save_intermediates", steps=4))
    strip = Image.open(tmp_path / "intermediates" / "00000.png")
    assert strip.size == (4 * 66 + 2, 2 * 66 + 2)  # x_t and predicted x_0 after each of the 4 steps
    s = np.asarray(strip.convert("RGB"))
    last_x_t, last_x0 = s[2:66, 2 + 3 * 66 : 66 + 3 * 66], s[2 + 66 : 66 + 66, 2 + 3 * 66 : 66 + 3 * 66]
    sample = pixels(tmp_path / "samples" / "00000.png")
    assert np.array_equal(last_x_t, sample)  # the latent after the last step is the sample
    assert np.abs(last_x0.astype(int) - sample).mean() < 4  # DDIM ends at a_0 = 0.99915, not 1
    first_x_t = s[2:66, 2:66]
    assert np.abs(first_x_t.astype(int) - sample).mean() > np.abs(last_x0.astype(int) - sample).mean()


# ----------------------------------------------------------------------------- safety checker and watermark


def test_safety_checker_replaces_flagged_images_and_reports_them(tiny, safety_dirs, tmp_path):
    args = ["--config", tiny.config, "--ckpt", tiny.ckpt, "--H", 64, "--W", 64, "--ddim_steps", 2,
            "--n_samples", 2, "--n_iter", 1, "--seed", 42]
    out, _ = run_ok(args + ["--outdir", tmp_path / "black", "--safety_checker", safety_dirs["flags_all"]])
    samples = tmp_path / "black" / "samples"
    for k in range(2):
        assert not pixels(samples / f"{k:05d}.png").any()
        assert f"flagged by the safety checker: {samples / f'{k:05d}.png'} (seed {42 + k})" in out
    assert not pixels(tmp_path / "black" / "grid-0000.png").any()
    assert "2 flagged" in out

    run_ok(args + ["--outdir", tmp_path / "blur", "--safety_checker", safety_dirs["flags_all"], "--nsfw", "blur"])
    run_ok(args + ["--outdir", tmp_path / "pass", "--safety_checker", safety_dirs["flags_none"]])
    run_ok(args + ["--outdir", tmp_path / "off", "--no_safety_checker"])
    blurred = pixels(tmp_path / "blur" / "samples" / "00000.png").astype(float)
    original = pixels(tmp_path / "off" / "samples" / "00000.png").astype(float)
    assert blurred.any() and blurred.std(axis=(0, 1)).max() < 0.5 * original.std(axis=(0, 1)).min()
    for k in range(2):  # an image the checker passes is written as generated
        name = f"samples/{k:05d}.png"
        assert (tmp_path / "pass" / name).read_bytes() == (tmp_path / "off" / name).read_bytes()


def test_missing_safety_checker_stops_with_how_to_fix(tiny, tmp_path):
    """Default: the local Hugging Face cache (empty here), offline: no download, never skipped silently."""
    r = run_script(base_args(tiny, tmp_path / "out")[:-1], env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("txt2img: error: cannot load the safety checker")
    assert "--no_safety_checker" in r.stderr and "--safety_checker DIR" in r.stderr
    assert not (tmp_path / "out" / "samples").exists() or not list((tmp_path / "out" / "samples").iterdir())


def test_watermark_on_samples_at_256(tiny, tmp_path):
    args = ["--config", tiny.config, "--ckpt", tiny.ckpt, "--H", 256, "--W", 256, "--ddim_steps", 2,
            "--n_samples", 1, "--n_iter", 1, "--no_safety_checker", "--skip_grid"]
    _, err = run_ok(args + ["--outdir", tmp_path / "plain", "--no_watermark"])
    _, err_marked = run_ok(args + ["--outdir", tmp_path / "marked"])
    assert "watermark" not in err_marked
    raw = Image.open(tmp_path / "plain" / "samples" / "00000.png").convert("RGB")
    marked = Image.open(tmp_path / "marked" / "samples" / "00000.png")
    assert np.array_equal(np.asarray(marked.convert("RGB")), np.asarray(imagelib.put_watermark(raw, "StableDiffusionV1")))
    # dwtDct repeats each of the 136 bits only ~7 times at 256x256 and this random model's output
    # is noise-like, so a few bits may flip; an unmarked image reads ~50% wrong.
    text = b"StableDiffusionV1"
    wrong = lambda img: int((np.unpackbits(np.frombuffer(imagelib.read_watermark(img, len(text)), np.uint8))
                             != np.unpackbits(np.frombuffer(text, np.uint8))).sum())
    assert wrong(marked) <= 10 < 40 <= wrong(raw)


# ----------------------------------------------------------------------------- the demo model


def test_demo_runs_from_any_directory(tmp_path, monkeypatch):
    if not (REPO / "models" / "demo" / "shapes.safetensors").is_file():
        pytest.skip("the bundled demo model is not in this checkout yet")
    monkeypatch.chdir(tmp_path)
    out, err = run_ok(["--demo", "--prompt", "a red circle", "--n_samples", 1, "--n_iter", 1, "--ddim_steps", 5])
    assert "not needed for the bundled demo model" in err
    sample = tmp_path / "outputs" / "txt2img-samples" / "samples" / "00000.png"
    assert Image.open(sample).size == (64, 64) and "Model: shapes" in params(sample)


def test_demo_image_re_renders_from_from_png_alone(tmp_path, monkeypatch):
    """--from_png finds the demo model by the PNG's model hash: no other flag, the same pixels."""
    if not (REPO / "models" / "demo" / "shapes.safetensors").is_file():
        pytest.skip("the bundled demo model is not in this checkout yet")
    monkeypatch.chdir(tmp_path)
    run_ok(["--demo", "--prompt", "a blue square on a black background", "--n_samples", 2, "--n_iter", 1,
            "--ddim_steps", 6, "--seed", 3, "--outdir", "first"])
    source = tmp_path / "first" / "samples" / "00001.png"
    out, err = run_ok(["--from_png", str(source)])
    again = tmp_path / "outputs" / "txt2img-samples" / "samples" / "00000.png"
    assert "not needed for the bundled demo model" in err
    assert params(again) == params(source) and "Seed: 4," in params(again)
    assert np.array_equal(pixels(again), pixels(source))


def test_from_png_finds_the_checkpoint_under_models_and_in_the_hash_cache(first_run, tiny, tmp_path, monkeypatch):
    source = first_run.outdir / "samples" / "00001.png"
    monkeypatch.chdir(tmp_path)
    # under ./models/ (recursively), never hashed before (the cache is this test's own)
    (tmp_path / "models" / "sd" / "v1").mkdir(parents=True)
    shutil.copy(tiny.ckpt, tmp_path / "models" / "sd" / "v1" / "mine.safetensors")
    run_ok(["--config", tiny.config, "--outdir", "a", "--no_safety_checker", "--from_png", source])
    assert np.array_equal(pixels(tmp_path / "a" / "samples" / "00000.png"), pixels(source))
    # gone from models/, but hashed before: the cache knows its path
    shutil.rmtree(tmp_path / "models")
    run_ok(["--config", tiny.config, "--ckpt", tiny.ckpt, "--outdir", "b", "--no_safety_checker", "--n_iter", 1,
            "--n_samples", 1, "--ddim_steps", 1])
    run_ok(["--config", tiny.config, "--outdir", "c", "--no_safety_checker", "--from_png", source])
    assert np.array_equal(pixels(tmp_path / "c" / "samples" / "00000.png"), pixels(source))


def test_a_run_reads_each_checkpoint_for_its_hash_at_most_once(first_run, tiny, tmp_path, monkeypatch):
    """--from_png searches by hash, then loads: the file found is hashed once (the cache serves the
    load), and a later run hashes nothing."""
    import ldm.hashing

    hashed, real_open = [], open

    def counting_open(path, *args, **kwargs):
        if args[:1] == ("rb",):
            hashed.append(Path(path).resolve())
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ldm.hashing, "open", counting_open, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copy(tiny.ckpt, tmp_path / "models" / "tiny.safetensors")
    source = first_run.outdir / "samples" / "00000.png"
    run_ok(["--config", tiny.config, "--outdir", "a", "--no_safety_checker", "--from_png", source])
    assert hashed.count((tmp_path / "models" / "tiny.safetensors").resolve()) == 1
    assert len(hashed) == len(set(hashed))
    hashed.clear()
    run_ok(["--config", tiny.config, "--outdir", "b", "--no_safety_checker", "--from_png", source])
    assert hashed == []


def test_from_png_of_an_unknown_model_says_which_model_and_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "a red fox\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model hash: 0123abcdef, Model: mystery"
    imagelib.save_png(Image.new("RGB", (64, 64)), tmp_path / "x.png", text)
    code, out, err = run(["--from_png", tmp_path / "x.png"])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("txt2img: error: "), err
    for part in ("mystery", "0123abcdef", "demo model", "models/", "hashed before", "--ckpt"):
        assert part in err, part
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_thread_count_follows_the_work(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for extra, expected in (([], "1 CPU thread(s)"), (["--threads", 2], "2 CPU thread(s)")):
        _, err = run_ok(base_args(tiny, tmp_path, "--n_samples", 1, "--n_iter", 1, "-v", *extra, steps=1))
        assert expected in err
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice: left to torch
    _, err = run_ok(base_args(tiny, tmp_path, "--n_samples", 1, "--n_iter", 1, "-v", "--threads", 2, steps=1))
    assert "2 CPU thread(s)" in err
    _, err = run_ok(base_args(tiny, tmp_path, "--n_samples", 1, "--n_iter", 1, "-v", steps=1))
    assert "CPU thread(s)" not in err


# ----------------------------------------------------------------------------- concurrency, interruption, full disk


@pytest.mark.slow
def test_concurrent_runs_into_one_outdir(tiny, tmp_path):
    outdir = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *base_args(tiny, outdir, "--n_samples", 2, "--n_iter", 1,
                                                                          "--seed", seed, steps=2)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
             for seed in (100, 200)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert names(outdir / "samples") == [f"{k:05d}.png" for k in range(4)]  # nothing overwritten, no leftovers
    assert names(outdir) == ["grid-0000.png", "grid-0001.png", "samples"]
    seeds = sorted(int(params(p).split("Seed: ")[1].split(",")[0]) for p in (outdir / "samples").iterdir())
    assert seeds == [100, 101, 200, 201]


def test_ctrl_c_keeps_saved_images_and_writes_the_grid(tiny, tmp_path, monkeypatch):
    from ldm.pipeline import Txt2Img

    real, calls = Txt2Img.generate_batch, []

    def interrupted_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Txt2Img, "generate_batch", interrupted_second_batch)
    code, _, err = run(base_args(tiny, tmp_path, "--n_samples", 2, "--n_iter", 3, steps=2))
    assert code == 130
    assert names(tmp_path / "samples") == ["00000.png", "00001.png"]
    grid = Image.open(tmp_path / "grid-0000.png")
    assert grid.size == (2 * 66 + 2, 66 + 2)  # the grid of the finished batch
    assert "interrupted: 2 image(s) saved" in err and "grid-0000.png" in err


@pytest.mark.slow
def test_sigint_from_the_terminal(tiny, tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, str(SCRIPT), *base_args(tiny, tmp_path, "--n_samples", 1, "--n_iter", 200,
                                                                         steps=2)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    first = tmp_path / "samples" / "00001.png"
    deadline = time.monotonic() + 240
    while not (first.is_file() and first.stat().st_size > 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = names(tmp_path / "samples")
    assert 2 <= len(saved) < 200 and saved == [f"{k:05d}.png" for k in range(len(saved))]  # no placeholder left
    for name in saved:
        assert params(tmp_path / "samples" / name)
    grid = Image.open(tmp_path / "grid-0000.png")  # n_rows = n_samples = 1: one row per finished image
    assert grid.size[0] == 66 + 2 and (grid.size[1] - 2) // 66 in (len(saved) - 1, len(saved))
    assert "interrupted" in err and "Traceback" not in err


def test_full_disk_mid_run(tiny, tmp_path, monkeypatch):
    real_save, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            fp.write(b"\x89PNG\r\n partial")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    code, _, err = run(base_args(tiny, tmp_path, "--n_samples", 2, "--n_iter", 2, steps=2))
    monkeypatch.undo()
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("txt2img:")]
    assert lines[-1].startswith("txt2img: error: disk full: ") and "00002.png" in lines[-1]
    assert "2 image(s) saved" in lines[-1]
    assert names(tmp_path / "samples") == ["00000.png", "00001.png"]  # no partial file, no placeholder
    for k in range(2):
        assert pixels(tmp_path / "samples" / f"{k:05d}.png").shape == (64, 64, 3)


# ----------------------------------------------------------------------------- bad input


BAD_INPUTS = {
    "missing checkpoint": (["--ckpt", "{tmp}/nowhere/model.ckpt"],
                           ["checkpoint not found", "models/ldm/stable-diffusion-v1/model.ckpt", "--ckpt", "--demo"]),
    "unreadable checkpoint": (["--ckpt", "{tmp}/garbage.ckpt"], ["cannot read checkpoint"]),
    "missing config": (["--config", "{tmp}/nowhere.yaml"], ["config file not found"]),
    "config and checkpoint do not match": (["--config", str(REPO / V1_CONFIG)], ["does not match the config"]),
    "H not a multiple of 8": (["--H", "65"], ["--H must be a multiple of --f (8), got 65"]),
    "W not a multiple of f": (["--W", "72", "--f", "16"], ["--W must be a multiple of --f (16)"]),
    "W too fine for the UNet": (["--W", "72"], ["--W must be a multiple of 64 for this model (--f 8 x the UNet's 8)"]),
    "f that is not the model's": (["--f", "16", "--W", "64", "--H", "64"], ["--f 16: this model's autoencoder downsamples by 8"]),
    "C that is not the model's": (["--C", "3"], ["--C 3: this model has 4 latent channels"]),
    "zero samples": (["--n_samples", "0"], ["--n_samples must be a positive integer"]),
    "negative iterations": (["--n_iter", "-1"], ["--n_iter must be a positive integer"]),
    "zero steps": (["--ddim_steps", "0"], ["--ddim_steps must be a positive integer"]),
    "unknown sampler": (["--sampler", "warp_drive"], ["unknown sampler 'warp_drive'", "euler_a"]),
    "two samplers": (["--plms", "--dpm_solver"], ["choose one sampler"]),
    "eta for a deterministic sampler": (["--plms", "--ddim_eta", "0.5"], ["deterministic"]),
    "missing prompt file": (["--from-file", "{tmp}/none.txt"], ["cannot read --from-file"]),
    "empty prompt file": (["--from-file", "{tmp}/empty.txt"], ["holds no prompts"]),
    "prompt file not UTF-8": (["--from-file", "{tmp}/latin1.txt"], ["not UTF-8"]),
    "unwritable outdir": (["--outdir", "{tmp}/a_file/out"], ["cannot write to --outdir"]),
    "laion400m": (["--laion400m"], ["not supported"]),
    "empty watermark text": (["--watermark", ""], ["--watermark needs a text"]),
    "PNG without parameters": (["--from_png", "{tmp}/plain.png"], ["no generation parameters"]),
    "zero threads": (["--threads", "0"], ["--threads must be a positive integer"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error(case, tiny, tmp_path):
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a checkpoint" * 10)
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "a_file").write_text("x")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    outdir = tmp_path / "out"
    (outdir / "samples").mkdir(parents=True)
    (outdir / "samples" / "00000.png").write_bytes(b"an earlier image")
    extra, expected = BAD_INPUTS[case]
    args = base_args(tiny, outdir) + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, out, err = run(args)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("txt2img: error: "), err
    for text in expected:
        assert text in err
    assert names(outdir / "samples") == ["00000.png"]  # nothing written, nothing lost
    assert (outdir / "samples" / "00000.png").read_bytes() == b"an earlier image"


def test_script_exit_codes_and_messages(tiny, tmp_path):
    r = run_script(base_args(tiny, tmp_path, "--ckpt", tmp_path / "missing.ckpt"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("txt2img: error: checkpoint not found:")
    r = run_script(["--n_samples", "three"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("txt2img: error: argument --n_samples: invalid int value: 'three'")
    r = run_script(["--list_samplers"])
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[0] == "ddim" and "euler_a" in r.stdout


@pytest.mark.slow
def test_console_script(tiny, tmp_path):
    exe = shutil.which("txt2img")
    if exe is None:
        pytest.skip("the txt2img console script is not installed (pip install -e .)")
    r = run_script(base_args(tiny, tmp_path, "--n_samples", 1, "--n_iter", 1, steps=1), cmd=[exe])
    assert r.returncode == 0, r.stderr
    assert names(tmp_path / "samples") == ["00000.png"]
    r = run_script(["--H", "63"], cmd=[exe])
    assert r.returncode == 1 and r.stderr == "txt2img: error: --H must be a multiple of --f (8), got 63\n"


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys, io, contextlib; from ldm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: rc = main(['--help'])\n"
            "assert rc == 0 and '--negative_prompt' in out.getvalue() and '--list_samplers' in out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert time.perf_counter() - start < 10  # generous for a loaded 2-core machine; typically 0.1 s


@pytest.mark.slow
def test_openmp_spin_count_is_set_unless_the_user_chose_a_policy():
    from ldm.defaults import OPENMP_SPINCOUNT, set_openmp_defaults

    env = {}
    assert set_openmp_defaults(env) and env == {"GOMP_SPINCOUNT": OPENMP_SPINCOUNT}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(chosen)
        assert not set_openmp_defaults(env) and env == chosen
    code = ("import os, sys; from ldm.cli import main; before = 'torch' in sys.modules; main(['--H', '63']); "
            "print(before, os.environ.get('GOMP_SPINCOUNT'))")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for extra, expected in (({}, f"False {OPENMP_SPINCOUNT}"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "False None")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=dict(base, PYTHONPATH=str(REPO), **extra))
        assert r.stdout.strip() == expected, r.stderr
