"""The web UIs' `parameters` text of a PNG: the settings of one image, written and read back.

    a watercolor fox
    Negative prompt: blurry, lowres
    Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 8, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

The text itself is formatted and parsed by `ldm.images`; this module maps it to and from our settings.
"""

from __future__ import annotations

from . import images as imagelib

# Registry name -> the name the AUTOMATIC1111 web UI writes in its `parameters` text, where it has one.
WEBUI_SAMPLER_NAMES = {
    "ddim": "DDIM", "plms": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M", "lms_karras": "LMS Karras", "dpmpp_2m_karras": "DPM++ 2M Karras",
}


def number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def settings(item, opts, model_name: str, model_hash: str | None) -> dict:
    """The web UI's settings line of one image (a WorkItem made with Options), as an ordered dict."""
    s = {
        "Steps": opts.steps,
        "Sampler": WEBUI_SAMPLER_NAMES.get(opts.sampler, opts.sampler),
        "CFG scale": number(opts.scale),
        "Seed": item.seed,
        "Size": f"{opts.W}x{opts.H}",
    }
    if model_hash:
        s["Model hash"] = model_hash
    s["Model"] = model_name
    if getattr(opts, "strength", None) is not None:  # img2img
        s["Denoising strength"] = number(float(opts.strength))
    if getattr(opts, "hr_scale", None) is not None:  # the hires fix, as the web UI writes it
        s["Denoising strength"] = number(float(opts.hr_strength))
        s["Hires upscale"] = number(float(opts.hr_scale))
        s["Hires steps"] = opts.hr_steps or opts.steps
        s["Hires upscaler"] = {"latent": "Latent", "lanczos": "Lanczos"}.get(opts.hr_upscaler, opts.hr_upscaler)
    if opts.eta is not None and (opts.eta or opts.sampler != "ddim"):
        s["Eta"] = number(opts.eta)
    if not opts.emphasis:
        s["Emphasis"] = "None"
    s.update(size_conditioning(opts))
    return s


def size_conditioning(opts) -> dict:
    """SDXL's size conditioning where it is not the default (original size W x H like Size, crop top,left)."""
    s = {}
    if getattr(opts, "original_size", None) is not None:
        s["Original size"] = f"{opts.original_size[1]}x{opts.original_size[0]}"
    if getattr(opts, "crop_coords", None) is not None:
        s["Crop coords"] = f"{opts.crop_coords[0]},{opts.crop_coords[1]}"
    if getattr(opts, "aesthetic_score", None) is not None:
        s["Aesthetic score"] = number(float(opts.aesthetic_score))
    return s


def parameters_text(item, settings_line: dict) -> str:
    """The whole `parameters` text of one image."""
    return imagelib.format_parameters({"prompt": item.prompt, "negative_prompt": item.negative_prompt,
                                       "settings": settings_line})


def sampler_from_label(label: str) -> str:
    """The registry name of a sampler as written in a `parameters` text (web UI label or our name)."""
    from .samplers import SAMPLERS

    by_label = {v.lower(): k for k, v in WEBUI_SAMPLER_NAMES.items()}
    name = by_label.get(label.strip().lower(), label.strip().lower())
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {label!r} in the image's parameters; valid samplers: {', '.join(SAMPLERS)}")
    return name


def parse_hash_list(text: str) -> dict[str, str]:
    """`name: hash, name2: hash2` (the web UIs' `Lora hashes` and `TI hashes`) -> {name: hash}."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip() and value.strip():
            out[name.strip()] = value.strip()
    return out


def options_from_parameters(text: str) -> dict:
    """What a `parameters` text records, as keyword arguments of `Txt2Img.__call__` (prompt,
    negative_prompt, steps, sampler, scale, seed, H, W, eta, emphasis, clip_skip; SDXL's original_size,
    crop_coords, aesthetic_score when recorded) plus "model_hash" and "model" when present, and
    "lora_hashes" / "ti_hashes" ({name: short hash}, maybe empty). ValueError when it lacks the seed or the steps."""
    meta = imagelib.parse_parameters(text)
    s = meta["settings"]
    missing = [k for k in ("Steps", "Seed") if k not in s]
    if missing:
        raise ValueError(f"the image's parameters lack {' and '.join(missing)}")
    out = {"prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"]}
    try:
        out["steps"] = int(s["Steps"])
        out["seed"] = int(s["Seed"])
        if "Sampler" in s:
            out["sampler"] = sampler_from_label(s["Sampler"])
        if "CFG scale" in s:
            out["scale"] = float(s["CFG scale"])
        if "Size" in s:
            w, h = s["Size"].lower().split("x")
            out["W"], out["H"] = int(w), int(h)
        if "Eta" in s:
            out["eta"] = float(s["Eta"])
        if "Original size" in s:
            w, h = s["Original size"].lower().split("x")
            out["original_size"] = (int(h), int(w))
        if "Crop coords" in s:
            top, left = s["Crop coords"].split(",")
            out["crop_coords"] = (int(top), int(left))
        if "Aesthetic score" in s:
            out["aesthetic_score"] = float(s["Aesthetic score"])
        if "Hires upscale" in s:  # the hires fix; its "Denoising strength" is the second pass's
            out["hr_scale"] = float(s["Hires upscale"])
            if "Hires steps" in s:
                out["hr_steps"] = int(s["Hires steps"])
            if "Hires upscaler" in s:
                out["hr_upscaler"] = s["Hires upscaler"].strip().lower()
            if "Denoising strength" in s:
                out["hr_strength"] = float(s["Denoising strength"])
        elif "Denoising strength" in s:  # img2img
            out["strength"] = float(s["Denoising strength"])
    except ValueError as e:
        if "unknown sampler" in str(e):
            raise
        raise ValueError(f"malformed settings in the image's parameters: {e}") from None
    out["emphasis"] = s.get("Emphasis", "").lower() not in ("none", "off")
    if "Clip skip" in s:
        try:
            out["clip_skip"] = int(s["Clip skip"])
        except ValueError:
            raise ValueError(f"malformed Clip skip in the image's parameters: {s['Clip skip']!r}") from None
    out["lora_hashes"] = parse_hash_list(s.get("Lora hashes", ""))
    out["ti_hashes"] = parse_hash_list(s.get("TI hashes", ""))
    if "Model hash" in s:
        out["model_hash"] = s["Model hash"]
    if "Model" in s:
        out["model"] = s["Model"]
    if "VAE hash" in s:
        out["vae_hash"] = s["VAE hash"]
    if "VAE" in s:
        out["vae"] = s["VAE"]
    return out
