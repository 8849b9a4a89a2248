"""The lean rotary embedding (`lean_rope.py`) computes diffusers' HiDream rope and attention, forward and backward."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.transformers.transformer_hidream_image import apply_rope

from trainer_core.speedups.lean_rope import PairRotation, install_lean_rope, is_hidream_attention, uninstall_lean_rope

from conftest import cfg_forward


def _freqs(tokens: int, pairs: int, seed: int = 0) -> torch.Tensor:
    """Rotation matrices (1, S, 1, D/2, 2, 2) as HiDream's embedder builds them: [[cos, -sin], [sin, cos]]."""
    angles = torch.rand(1, tokens, 1, pairs, generator=torch.Generator().manual_seed(seed)) * 6.3
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(1, tokens, 1, pairs, 2, 2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 0.0), (torch.bfloat16, 1e-2)])
def test_pair_rotation_is_diffusers_rope_forward_and_backward(dtype, tol):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 40, 3, 16, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(2, 40, 3, 16, generator=g).to(dtype).requires_grad_(True)
    grad_q, grad_k = (torch.randn(2, 40, 3, 16, generator=g).to(dtype) for _ in range(2))
    freqs = _freqs(40, 8)

    stock_q, stock_k = apply_rope(q, k, freqs)
    torch.autograd.backward([stock_q, stock_k], [grad_q, grad_k])
    stock_grads = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    lean_q, lean_k = PairRotation.apply(q, freqs), PairRotation.apply(k, freqs)
    torch.autograd.backward([lean_q, lean_k], [grad_q, grad_k])

    assert torch.equal(lean_q, stock_q) and torch.equal(lean_k, stock_k)  # the same float32 expression
    for lean, stock in zip((q.grad, k.grad), stock_grads):
        assert lean.dtype == dtype
        torch.testing.assert_close(lean.float(), stock.float(), rtol=tol, atol=1e-6 if tol == 0 else tol)


def _block_call(transformer, block_index: int):
    """Inputs and a call of double-stream block `block_index` of the tiny model (random inputs that want grads)."""
    block = transformer.double_stream_blocks[block_index]
    g = torch.Generator().manual_seed(2)
    dim = transformer.inner_dim
    image = torch.randn(1, 16, dim, generator=g, requires_grad=True)
    text = torch.randn(1, 24, dim, generator=g, requires_grad=True)
    temb = torch.randn(1, dim, generator=g)
    ids = torch.zeros(1, 40, 3)
    ids[0, :16, 1], ids[0, :16, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    rope = transformer.pe_embedder(ids)
    return (image, text), lambda: block(hidden_states=image, encoder_hidden_states=text, temb=temb,
                                        image_rotary_emb=rope)


def test_lean_rope_block_matches_stock_forward_and_backward(tiny_transformer):
    """A double-stream block (image and text streams in one attention) with the lean processor: same outputs, same
    gradients for both streams' inputs and every weight."""
    stock = tiny_transformer.train().requires_grad_(True)
    lean = copy.deepcopy(stock)
    assert install_lean_rope(lean) == len([m for m in stock.modules() if is_hidream_attention(m)]) > 0

    results = []
    for model in (stock, lean):
        inputs, run = _block_call(model, 0)
        image, text = run()
        (image.square().sum() + text.pow(3).sum()).backward()
        weights = {n: p.grad for n, p in model.double_stream_blocks[0].named_parameters() if p.grad is not None}
        results.append(((image, text), [t.grad for t in inputs], weights))
    (outs0, input_grads0, weights0), (outs1, input_grads1, weights1) = results
    for a, b in zip(outs0 + tuple(input_grads0), outs1 + tuple(input_grads1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert weights0.keys() == weights1.keys() and any("attn1.to_q" in n for n in weights0)
    for name, grad in weights0.items():  # float32 sums in another order: relative to each gradient's size
        assert ((weights1[name] - grad).norm() / grad.norm()).item() < 1e-5, name


def test_uninstall_restores_the_stock_processor(tiny_transformer):
    before = [type(m.processor) for m in tiny_transformer.modules() if hasattr(m, "processor")]
    install_lean_rope(tiny_transformer)
    assert all(type(m.processor).__name__ == "LeanRopeAttnProcessor"
               for m in tiny_transformer.modules() if hasattr(m, "processor"))
    uninstall_lean_rope(tiny_transformer)
    assert [type(m.processor) for m in tiny_transformer.modules() if hasattr(m, "processor")] == before


def test_cfg_sampling_step_is_unchanged(tiny_transformer):
    step = cfg_forward(tiny_transformer.eval(), seed=5, timestep=300.0)
    stock = step()
    install_lean_rope(tiny_transformer)
    torch.testing.assert_close(step(), stock, rtol=1e-5, atol=1e-6)


def test_an_attention_other_than_the_checked_one_keeps_diffusers_processor(tiny_transformer, caplog):
    """The lean processor reimplements diffusers 0.42.1's HiDream attention: on any other attention code (here a
    real alternative processor, its own __call__ over diffusers'), it stays off with one log line and diffusers'
    code runs, giving diffusers' result."""
    import logging

    from diffusers.models.transformers import transformer_hidream_image as stock_module

    class HiDreamAttnProcessor(stock_module.HiDreamAttnProcessor):  # e.g. a newer diffusers' processor
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return super().__call__(attn, hidden_states, *args, **kwargs)

    step = cfg_forward(tiny_transformer.eval(), seed=5, timestep=300.0)
    expected = step()
    attentions = [m for m in tiny_transformer.modules() if is_hidream_attention(m)]
    for module in attentions:
        module.set_processor(HiDreamAttnProcessor())
    with caplog.at_level(logging.WARNING, logger="trainer_core.speedups.checked"):
        assert install_lean_rope(tiny_transformer) == 0
        assert install_lean_rope(tiny_transformer) == 0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "lean_rope is off" in said[0] and "HiDreamAttnProcessor.__call__" in said[0]
    assert all(type(m.processor) is HiDreamAttnProcessor for m in attentions)
    torch.testing.assert_close(step(), expected, rtol=0, atol=0)
