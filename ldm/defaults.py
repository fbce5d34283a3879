"""Defaults of the original txt2img script, shared by the command line and the library.

Imports nothing, so that the command line can read them without loading torch (`--help` stays instant).
"""

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
DEFAULT_OUTDIR = "outputs/txt2img-samples"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
