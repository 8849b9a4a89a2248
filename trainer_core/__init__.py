"""HiDream-I1 LoKr trainer core: datasets, embedding caches, LoKr training and LoKr-merged sampling.

Usable without ComfyUI (`python -m trainer_core --help`); the ComfyUI nodes in `nodes/` are thin wrappers over it.
This package never imports ComfyUI.
"""

__version__ = "0.1.0"
