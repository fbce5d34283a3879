"""The pieces under the command line that need no diffusion model: grids, PNG metadata, the
watermark, atomic numbered names, the safety checker's replacement, the plan of a run, --from-file."""

import threading

import numpy as np
import pytest
from PIL import Image

from ldm import images as imagelib
from ldm import pipeline
from ldm.cli import read_prompt_file


def noise_image(w, h, seed=0, lo=40, hi=216):
    """Per-pixel random colours away from 0 and 255: strong chroma texture, no clipping."""
    return Image.fromarray(np.random.default_rng(seed).integers(lo, hi, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- grid


def test_grid_layout_matches_torchvision_make_grid():
    tiles = [Image.new("RGB", (64, 48), (10 * i, 200, 30)) for i in range(5)]
    grid = imagelib.make_grid(tiles, n_rows=2)
    assert grid.size == (2 * (64 + 2) + 2, 3 * (48 + 2) + 2)  # 2 per row, 3 rows, 2-pixel padding
    a = np.asarray(grid)
    assert (a[:2] == 0).all() and (a[:, :2] == 0).all()  # black border
    assert tuple(a[2, 2]) == (0, 200, 30) and tuple(a[2 + 50, 2 + 66]) == (30, 200, 30)  # tiles 0 and 3
    assert (a[2 + 100 :, 2 + 66 :] == 0).all()  # the missing 6th tile is background
    assert imagelib.make_grid(tiles[:1], n_rows=3).size == (66 + 2, 50 + 2)


# ----------------------------------------------------------------------------- metadata


def test_parameters_text_round_trip_and_format():
    meta = {"prompt": "a (red:1.2) fox,\nsecond line", "negative_prompt": "blurry, low quality",
            "settings": {"Steps": 50, "Sampler": "DDIM", "CFG scale": "7.5", "Seed": 1234, "Size": "512x768",
                         "Model hash": "0123456789", "Model": "my, model"}}
    text = imagelib.format_parameters(meta)
    assert text == ('a (red:1.2) fox,\nsecond line\nNegative prompt: blurry, low quality\n'
                    'Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model hash: 0123456789, '
                    'Model: "my, model"')
    back = imagelib.parse_parameters(text)
    assert back["prompt"] == meta["prompt"] and back["negative_prompt"] == meta["negative_prompt"]
    assert back["settings"] == {k: str(v) for k, v in meta["settings"].items()}
    opts = pipeline.options_from_parameters(text)
    assert (opts["steps"], opts["seed"], opts["scale"], opts["W"], opts["H"], opts["sampler"]) == (50, 1234, 7.5, 512, 768, "ddim")
    assert opts["model_hash"] == "0123456789" and opts["emphasis"] is True


def test_parameters_of_a_webui_png_are_understood():
    text = ("masterpiece, 1girl\nNegative prompt: lowres\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, "
            "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0")
    opts = pipeline.options_from_parameters(text)
    assert opts["sampler"] == "euler_a" and opts["prompt"] == "masterpiece, 1girl" and opts["negative_prompt"] == "lowres"
    with pytest.raises(ValueError, match="unknown sampler"):
        pipeline.options_from_parameters(text.replace("Euler a", "UniPC"))
    with pytest.raises(ValueError, match="lack Seed"):
        pipeline.options_from_parameters("a fox\nSteps: 20, Sampler: DDIM")


def test_png_text_chunk_written_and_read(tmp_path):
    path = tmp_path / "x.png"
    path.touch()
    imagelib.save_png(Image.new("RGB", (8, 8)), path, "ünïcödé prompt ✓\nSteps: 2, Seed: 1")
    assert imagelib.read_parameters(path) == "ünïcödé prompt ✓\nSteps: 2, Seed: 1"
    (tmp_path / "plain.png").touch()
    imagelib.save_png(Image.new("RGB", (8, 8)), tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no generation parameters"):
        imagelib.read_parameters(tmp_path / "plain.png")


# ----------------------------------------------------------------------------- watermark


def test_watermark_decodes_back_to_its_text(tmp_path):
    """dwtDct repeats the bits over 4x4 blocks of the U channel's wavelet approximation: at 512x512 a
    136-bit text is written ~30 times. (It is read from the strongest coefficient of each block, so
    it survives only where the picture has chroma texture: flat images do not keep it.)"""
    img = noise_image(512, 512)
    for text in (imagelib.DEFAULT_WATERMARK, "txt2img"):
        marked = imagelib.put_watermark(img, text)
        assert marked.size == img.size and marked.mode == "RGB"
        path = tmp_path / f"{text}.png"
        path.touch()
        imagelib.save_png(marked, path, "p")  # through a PNG file, as a sample
        assert imagelib.read_watermark(Image.open(path), len(text)) == text.encode()
    # the mark lives in U (blue minus luma), so red is untouched: proof that RGB went in as BGR
    diff = np.abs(np.asarray(marked, dtype=int) - np.asarray(img, dtype=int)).mean(axis=(0, 1))
    assert diff[0] < 0.5 and diff[2] > 1


def test_watermark_refuses_small_images_with_a_clear_error():
    assert not imagelib.watermark_fits(Image.new("RGB", (255, 256)))
    assert imagelib.watermark_fits(Image.new("RGB", (128, 512)))  # the library counts pixels
    with pytest.raises(ValueError, match="too small"):
        imagelib.put_watermark(Image.new("RGB", (64, 64)))


# ----------------------------------------------------------------------------- numbered files


def test_numbering_continues_after_existing_files_and_ignores_others(tmp_path):
    for name in ("00000.png", "00007.png", "notes.txt", "123.png.bak"):
        (tmp_path / name).write_bytes(b"x")
    files = imagelib.NumberedFiles(tmp_path, 5)
    assert files.claim().name == "00008.png"
    assert files.claim().name == "00009.png"
    grids = imagelib.NumberedFiles(tmp_path, 4, prefix="grid-")
    assert grids.claim().name == "grid-0000.png"


def test_concurrent_claims_never_collide(tmp_path):
    claimed, lock = [], threading.Lock()

    def worker():
        files = imagelib.NumberedFiles(tmp_path, 5)  # each its own counter, like separate processes
        for _ in range(25):
            path = files.claim()
            with lock:
                claimed.append(path.name)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == len(set(claimed)) == 100
    assert sorted(claimed) == [f"{i:05d}.png" for i in range(100)]


def test_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    files = imagelib.NumberedFiles(tmp_path, 5)
    imagelib.save_numbered(Image.new("RGB", (8, 8)), files, "ok")

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError):
        imagelib.save_numbered(Image.new("RGB", (8, 8)), files, "lost")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]  # no placeholder, no temp file
    monkeypatch.undo()
    assert imagelib.read_parameters(tmp_path / "00000.png") == "ok"


# ----------------------------------------------------------------------------- safety replacement


def test_replacements():
    from ldm.safety import replacement

    img = noise_image(64, 64, lo=0, hi=256)
    assert not np.asarray(replacement(img, "black")).any()
    blurred = np.asarray(replacement(img, "blur"), dtype=float)
    assert blurred.std(axis=(0, 1)).max() < 0.1 * np.asarray(img, dtype=float).std(axis=(0, 1)).min()
    with pytest.raises(ValueError):
        replacement(img, "pixelate")


def test_missing_safety_checker_says_how_to_provide_it(tmp_path):
    from ldm.safety import SafetyChecker, SafetyCheckerError

    with pytest.raises(SafetyCheckerError, match="--no_safety_checker") as e:
        SafetyChecker.load(tmp_path)
    assert "lacks config.json" in str(e.value) and "--safety_checker DIR" in str(e.value)
    with pytest.raises(SafetyCheckerError, match="not found"):
        SafetyChecker.load(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the plan of a run


def test_plan_indices_and_seeds():
    batches = pipeline.prompt_batches("a fox", "", 3, repeat=True)
    plan = pipeline.plan_work(batches, n_iter=2, seed=100)
    assert [[(i.index, i.seed) for i in b] for b in plan] == [[(0, 100), (1, 101), (2, 102)], [(3, 103), (4, 104), (5, 105)]]
    fixed = pipeline.plan_work(batches, n_iter=2, seed=100, fixed_code=True)
    assert [i.seed for b in fixed for i in b] == [100, 101, 102, 100, 101, 102]


def test_plan_from_file_with_a_partial_last_batch():
    batches = pipeline.prompt_batches(["a", "b", "c", "d", "e"], ["", "x", "", "", "y"], 2, repeat=False)
    assert [len(b) for b in batches] == [2, 2, 1]
    plan = pipeline.plan_work(batches, n_iter=2, seed=0, fixed_code=True)
    assert [[i.prompt for i in b] for b in plan] == [["a", "b"], ["c", "d"], ["e"]] * 2
    assert [i.index for b in plan for i in b] == list(range(10))
    assert [i.seed for b in plan for i in b] == [0, 1, 0, 1, 0] * 2
    assert plan[2][0].negative_prompt == "y"


def test_start_code_contract():
    import torch

    code = pipeline.start_code(1234, (4, 8, 8))
    assert torch.equal(code, torch.randn([4, 8, 8], generator=torch.Generator("cpu").manual_seed(1234)))


def test_prompt_file_format(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red fox\n\n   \nune forêt — 森 --negative_prompt blurry, lowres\r\nlast line".encode())
    prompts, negatives = read_prompt_file(path, "default neg")
    assert prompts == ["a red fox", "une forêt — 森", "last line"]
    assert negatives == ["default neg", "blurry, lowres", "default neg"]
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "blank.txt", "")
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text \(line 2\)"):
        read_prompt_file(tmp_path / "latin1.txt", "")
    with pytest.raises(ValueError, match="cannot read --from-file"):
        read_prompt_file(tmp_path / "missing.txt", "")


def test_device_and_precision_choices():
    import torch

    assert pipeline.resolve_precision(torch.device("cpu"), "autocast") == (torch.float32, False, None)
    dtype, autocast, note = pipeline.resolve_precision(torch.device("cpu"), "half")
    assert dtype == torch.float32 and not autocast and "full precision" in note
    assert pipeline.resolve_precision(torch.device("cuda"), "autocast") == (torch.float32, True, None)
    assert pipeline.resolve_precision(torch.device("cuda"), "half") == (torch.float16, False, None)
    assert pipeline.resolve_precision(torch.device("mps"), "autocast") == (torch.float32, False, None)
    assert pipeline.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pipeline.pick_device().type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pipeline.pick_device("cuda")
