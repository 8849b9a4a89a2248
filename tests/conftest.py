"""Shared fixtures: one tiny HiDream model folder per test session, built by the project's own builder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tiny model's matmuls are microseconds long: thread hand-offs cost more than they save (measured: a
# 150-step run took 15.6 s on one thread, over 190 s with two threads on a busy 2-core machine).
torch.set_num_threads(1)
# torch.compile on the CPU writes C++ kernels that gcc builds; scalar kernels build in about two thirds of the time
# of vectorised ones (measured, the whole-block compile test from a cold cache: 124 s -> 82 s on 2 cores). What the
# compile tests check (graph capture, breaks, recompiles, the saved activations, the step's numbers) does not depend
# on inductor's SIMD code, and the GPU runs Triton kernels anyway. Subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

# tests/comfyui/ run against a real ComfyUI server in ComfyUI's own environment (scripts/test.sh runs them there
# with COMFYUI_DIR set); this suite's environment has no ComfyUI.
# tests/browser/ (the live training view in headless Chromium) likewise.
collect_ignore = [] if os.environ.get("COMFYUI_DIR") else ["comfyui", "browser"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainer_core.hidream.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-hidream", seed=0)


@pytest.fixture(scope="session")
def drawing_model_dir(tmp_path_factory) -> Path:
    """The drawing tiny HiDream (the shipped pretrained weights): for tests that look at pictures."""
    from trainer_core.hidream.tiny import build_drawing_model

    return build_drawing_model(tmp_path_factory.mktemp("drawing") / "tiny-hidream")


@pytest.fixture(scope="session")
def tiny_paths(tiny_model_dir):
    from trainer_core.hidream import resolve_model_paths

    return resolve_model_paths(tiny_model_dir)


@pytest.fixture()
def tiny_transformer(tiny_paths):
    """A fresh float32 transformer per test (tests wrap and mutate it)."""
    from trainer_core.hidream import load_transformer

    return load_transformer(tiny_paths, dtype=torch.float32)


def random_conditioning(transformer, batch: int = 1, seed: int = 0):
    """Random text conditioning with the shapes the tiny transformer expects."""
    from trainer_core.hidream import PromptEmbeds

    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    n_llama = max(cfg.llama_layers) + 1
    return PromptEmbeds(t5=torch.randn(batch, 128, cfg.caption_channels[0], generator=g),
                        llama=torch.randn(n_llama, batch, 128, cfg.caption_channels[1], generator=g),
                        pooled=torch.randn(batch, cfg.text_emb_dim, generator=g))


def cfg_forward(transformer, seed: int = 0, timestep: float = 500.0, dtype: torch.dtype = torch.float32):
    """A function running one CFG-sized (batch 2) no-grad forward of `transformer` on fixed random inputs, as the
    sampler calls it; its output is the model's (2, 16, 8, 8) prediction."""
    embeds = random_conditioning(transformer, batch=2, seed=seed).to(dtype=dtype)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return transformer(hidden_states=x, timesteps=torch.tensor([timestep, timestep]),
                               encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                               pooled_embeds=embeds.pooled, return_dict=False)[0]
    return forward
