"""What a CUDA GPU adds to the bytes of the tensors a dry run sees: the caching allocator's rounding, cuBLAS'
workspace and flash attention's backward workspace. The one place these figures live; each says where it comes from.

The benchmark's `peak_gib` is `torch.cuda.max_memory_allocated()`: the blocks torch's caching allocator handed out,
each rounded as below. What a card must have free is more: the allocator reserves whole segments
(`reserved_bytes`), and the CUDA context itself lives outside torch's counters (`CUDA_CONTEXT_BYTES`).
"""
from __future__ import annotations

import math

MiB = 2**20
GiB = 2**30

# c10/cuda/CUDACachingAllocator.cpp: every block is a multiple of 512 bytes (kMinBlockSize); blocks up to 1 MiB
# (kSmallSize) come from 2 MiB segments (kSmallBuffer), blocks under 10 MiB (kMinLargeAlloc) from 20 MiB segments
# (kLargeBuffer), larger ones get a segment of their own rounded up to 2 MiB (kRoundLarge).
BLOCK_BYTES = 512
SMALL_BLOCK_MAX = MiB
MEDIUM_BLOCK_MAX = 10 * MiB
LARGE_SEGMENT_ROUND = 2 * MiB

# aten/src/ATen/cuda/CublasHandlePool.cpp: the cuBLAS (and cuBLASLt) workspace of a handle and stream, allocated
# through the caching allocator at the first matmul and kept: 32 MiB on Hopper and newer (the default
# CUBLAS_WORKSPACE_CONFIG ":4096:8"), 4096 KiB x 2 + 16 KiB x 8 before. The dry run adds it at the first matmul
# on the accelerator (the training step's matmuls all run on the one compute stream).
CUBLAS_WORKSPACE_SM90 = 4096 * 1024 * 8
CUBLAS_WORKSPACE_OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8

# The CUDA context (kernels, cuBLAS/cuDNN handles' own state) is outside torch's counters; about 0.5 GiB with CUDA
# 12/13 and lazy module loading. Added only to the "does it fit a card" answer, never to a predicted peak.
CUDA_CONTEXT_BYTES = GiB // 2


def block_bytes(nbytes: int) -> int:
    """The bytes the caching allocator hands out for a request of `nbytes` (0 for an empty tensor)."""
    return 0 if nbytes <= 0 else math.ceil(nbytes / BLOCK_BYTES) * BLOCK_BYTES


def reserved_bytes(blocks: list[int]) -> int:
    """The segments live `blocks` (allocator blocks, in bytes) need at least: small and medium blocks packed into
    their shared 2 / 20 MiB segments, each large block in its own segment rounded up to 2 MiB. Fragmentation (a free
    block too small for the next request) comes on top; `expandable_segments:True` removes most of it."""
    small = sum(b for b in blocks if b <= SMALL_BLOCK_MAX)
    medium = sum(b for b in blocks if SMALL_BLOCK_MAX < b < MEDIUM_BLOCK_MAX)
    large = sum(math.ceil(b / LARGE_SEGMENT_ROUND) * LARGE_SEGMENT_ROUND for b in blocks if b >= MEDIUM_BLOCK_MAX)
    return (math.ceil(small / (2 * MiB)) * 2 * MiB + math.ceil(medium / (20 * MiB)) * 20 * MiB + large)


def cublas_workspace_bytes(capability: tuple[int, int]) -> int:
    return CUBLAS_WORKSPACE_SM90 if capability >= (9, 0) else CUBLAS_WORKSPACE_OLDER


def flash_backward_workspace(batch: int, heads: int, seq_q: int, head_dim: int) -> int:
    """Bytes flash attention's backward allocates for itself besides its outputs (flash_api.cpp, mha_bwd): a
    float32 dQ accumulator (B, S_q rounded up to 128, H, D rounded up to 32) and softmax_d, float32 (B, H, S_q
    rounded up to 128)."""
    seq = math.ceil(seq_q / 128) * 128
    dim = math.ceil(head_dim / 32) * 32
    return block_bytes(4 * batch * seq * heads * dim) + block_bytes(4 * batch * heads * seq)

