"""txt2img: Stable Diffusion v1 text-to-image, reimplemented from scratch."""

__version__ = "0.1.0"
