"""ComfyUI's VAE and CONDITIONING layouts mapped onto the trainer core's caches.

ComfyUI's Flux VAE class is built at a small width (its GroupNorm needs channels divisible by 32) with the same
weights as a diffusers AutoencoderKL, so the adapter's latents and images can be compared with the core's own VAE
path: ComfyUI returns raw latents z and takes/gives IMAGE (B, H, W, 3) in [0, 1]; the core caches (z - 0.1159) x
0.3611 and works on pixels (B, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

import importlib

import numpy as np
import torch


def small_flux_vaes(comfy):
    """(diffusers AutoencoderKL, ComfyUI VAE) with identical random weights, Flux's latent layout (16 channels)."""
    from comfy import diffusers_convert
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    diffusers_vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
        norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False).eval()
    ldm = diffusers_convert.convert_vae_state_dict(diffusers_vae.state_dict())
    # ComfyUI's configurable AutoencoderKL always has the 1x1 quant convs Flux's VAE lacks: make them identities.
    for name, channels in (("quant_conv", 32), ("post_quant_conv", 16)):
        ldm[f"{name}.weight"] = torch.eye(channels).reshape(channels, channels, 1, 1)
        ldm[f"{name}.bias"] = torch.zeros(channels)
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    comfy_vae = comfy.sd.VAE(sd=ldm, config={"params": {"embed_dim": 16, "ddconfig": ddconfig}},
                             dtype=torch.float32)
    return diffusers_vae, comfy_vae


def test_comfy_vae_adapter_caches_the_cores_scaled_latents_and_decodes_back(comfy_modules, pack):
    """Same weights, same images, same per-image generators: ComfyUI's VAE through the adapter caches what the
    core's diffusers VAE caches (a posterior sample, not ComfyUI's mode), and decodes like it."""
    adapters = importlib.import_module("hidream_lokr_pack.nodes.comfy_adapters")
    from trainer_core.data import VaeImageEncoder
    from trainer_core.hidream import latents_to_images

    diffusers_vae, comfy_vae = small_flux_vaes(comfy_modules)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (11, 12)]

    ours = adapters.ComfyVaeImageEncoder(comfy_vae).encode(pixels, generators())
    core = VaeImageEncoder(diffusers_vae, "diffusers").encode(pixels, generators())
    with torch.no_grad():
        mean = diffusers_vae.encode(pixels).latent_dist.mean
    assert ours.shape == (2, 16, 8, 8)
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-5)
    assert (ours - (mean - 0.1159) * 0.3611).abs().mean() > 1e-2  # a sample, not the mode
    assert comfy_vae.first_stage_model.regularization.__class__.__name__ == "DiagonalGaussianRegularizer"

    # the core's sampling latents -> the adapter's decode == the diffusers path (up to uint8 rounding)
    theirs = np.stack([np.asarray(i) for i in latents_to_images(diffusers_vae, ours)]).astype(int)
    decoded = np.stack([np.asarray(i) for i in adapters.ComfyVaeImageEncoder(comfy_vae).decode_latents(ours)])
    assert decoded.shape == (2, 64, 64, 3)
    assert np.abs(decoded.astype(int) - theirs).max() <= 1

    # and the sampler's LATENT output is what ComfyUI's own VAEDecode expects: raw z
    convert = importlib.import_module("hidream_lokr_pack.nodes.convert")
    torch.testing.assert_close(convert.scaled_to_raw_latents(ours), core / 0.3611 + 0.1159, rtol=1e-4, atol=1e-4)


def test_comfy_clip_gets_the_tokens_diffusers_gives_hidreams_encoders(comfy_modules, pack):
    """The adapter's tokens for ComfyUI's four HiDream encoders are those of diffusers' encode_prompt: the same
    tokenizer files through the classes HiDream's pipeline uses (the Llama's a PreTrainedTokenizerFast), max_length
    128, truncation; for a plain caption, one in ComfyUI's weight syntax (literal text to diffusers) and one longer
    than every window. ComfyUI's own tokenize differs on the last two, and on the Llama (docs/comfyui.md)."""
    from pathlib import Path

    import transformers
    from comfy.text_encoders import hidream
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5TokenizerFast

    adapters = importlib.import_module("hidream_lokr_pack.nodes.comfy_adapters")
    root = Path(hidream.__file__).parents[1]  # comfy/
    clip = CLIPTokenizer.from_pretrained(root / "sd1_tokenizer")
    t5 = T5TokenizerFast.from_pretrained(root / "text_encoders" / "t5_tokenizer")
    llama = PreTrainedTokenizerFast.from_pretrained(root / "text_encoders" / "llama_tokenizer")
    llama.pad_token = "<|eot_id|>"  # Llama-3.1-Instruct's eos, which HiDream's pipeline pads with

    def diffusers(tokenizer, caption, length=128):
        return tokenizer(caption, padding="max_length", max_length=length, truncation=True,
                         add_special_tokens=True).input_ids

    long = " ".join(f"a {c} circle beside a {d} square," for c in ("red", "green", "blue", "pink") * 4
                    for d in ("yellow", "white"))
    weighted = "a cat (sleeping), (best quality:1.3)"
    tokenizer = hidream.HiDreamTokenizer(tokenizer_data={"clip_l_max_length": 248, "clip_g_max_length": 248})
    for clip_positions in (248, 77):  # HiDream's long CLIP files (ComfyUI reads the positions off the file), 77
        tokenizer.clip_l.max_length = tokenizer.clip_g.max_length = clip_positions
        for caption in ("a red circle on a blue background", weighted, long):
            ours = {k: [t for t, _ in chunks[0]] for k, chunks in
                    adapters.diffusers_tokens(tokenizer, caption).items()}
            assert ours["l"] == ours["g"] == diffusers(clip, caption, min(128, clip_positions)), caption
            assert ours["t5xxl"] == diffusers(t5, caption), caption
            assert ours["llama"] == diffusers(llama, caption), caption
    assert diffusers(clip, long)[-1] == 49407 and 49407 not in diffusers(clip, long)[:-1]  # cut, then ended

    comfy_own = tokenizer.tokenize_with_weights(weighted)
    assert {w for _, w in comfy_own["l"][0]} != {1.0}  # ComfyUI weights "(best quality:1.3)"
    if int(transformers.__version__.split(".")[0]) >= 5:  # its LlamaTokenizerFast loses the spaces
        assert [t for t, _ in tokenizer.tokenize_with_weights("a red circle")["llama"][0]][:4] != \
            diffusers(llama, "a red circle")[:4]


def test_comfy_hidream_conditioning_maps_onto_prompt_embeds(pack):
    adapters = importlib.import_module("hidream_lokr_pack.nodes.comfy_adapters")
    g = torch.Generator().manual_seed(0)
    t5 = torch.randn(1, 128, 32, generator=g)
    pooled = torch.randn(1, 40, generator=g)
    llama = torch.randn(1, 4, 150, 48, generator=g)  # ComfyUI: (B, layers, T, D), T > 128 (never truncated)
    embeds = adapters.conditioning_to_embeds(t5, {"pooled_output": pooled, "conditioning_llama3": llama})
    assert embeds.llama.shape == (4, 1, 128, 48)  # the core: (layers, B, 128, D)
    assert torch.equal(embeds.llama[2, 0], llama[0, 2, :128]) and torch.equal(embeds.t5, t5)
    assert torch.equal(embeds.pooled, pooled)
    full = adapters.conditioning_to_embeds(t5, {"pooled_output": pooled, "conditioning_llama3": llama},
                                           llama_tokens=None)
    assert full.llama.shape == (4, 1, 150, 48)
    missing = adapters.conditioning_to_embeds(  # an encoder left out: ComfyUI puts zeros [1, 32, 1, D]
        t5, {"pooled_output": pooled, "conditioning_llama3": torch.zeros(1, 4, 1, 48)})
    assert missing.llama.shape == (4, 1, 128, 48) and not missing.llama.any()


def test_comfy_hidream_clip_adapter_gives_the_cores_layout(comfy_modules, pack):
    """ComfyUI's HiDream text encoder with only CLIP-L present (the others are replaced by zeros, as ComfyUI does
    for a partial set) -- the real widths: T5 4096, Llama 32 layers x 4096, pooled 768 + 1280."""
    comfy = comfy_modules
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import hidream

    adapters = importlib.import_module("hidream_lokr_pack.nodes.comfy_adapters")
    target = ClipTarget(hidream.HiDreamTokenizer,
                        hidream.hidream_clip(clip_l=True, clip_g=False, t5=False, llama=False))
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():  # ComfyUI leaves weights uninitialised until a file loads
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    encoder = adapters.ComfyClipTextEncoder(clip)
    embeds = encoder.encode(["a red circle on a blue background", "a green square"])
    assert embeds.t5.shape == (2, 128, 4096) and embeds.llama.shape == (32, 2, 128, 4096)
    assert embeds.pooled.shape == (2, 2048)
    assert embeds.pooled[:, :768].abs().sum() > 0 and not embeds.pooled[:, 768:].any()  # CLIP-L, then CLIP-G
    assert not embeds.t5.any() and not embeds.llama.any()
    assert not torch.equal(embeds.pooled[0], embeds.pooled[1])
    assert adapters.ComfyClipTextEncoder(clip).identity == encoder.identity  # same weights, same cache entries


def test_comfy_model_identity_reads_no_weights_and_follows_the_model_files(comfy_modules, pack, tmp_path):
    """The cache identity of a ComfyUI VAE/CLIP comes from the graph that loaded it (file names, sizes and times,
    every setting on the way) or ComfyUI's own reload record, never from its weights: here the weights are on the
    meta device, where reading any value raises."""
    import os

    import folder_paths

    comfy = comfy_modules
    adapters = importlib.import_module("hidream_lokr_pack.nodes.comfy_adapters")

    def meta_vae():
        vae = small_flux_vaes(comfy)[1]
        vae.first_stage_model.to("meta")
        return vae

    folder = tmp_path / "vae"
    folder.mkdir()
    for name in ("ae.safetensors", "other.safetensors"):
        (folder / name).write_bytes(b"0" * 64)
    folder_paths.add_model_folder_path("vae", str(folder))

    def origin(loader_id: str, vae_name: str = "ae.safetensors") -> str:
        prompt = {loader_id: {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
                  "31": {"class_type": "HiDreamLoKrCacheLatents", "inputs": {"vae": [loader_id, 0]}}}
        return adapters.graph_origin(prompt, "31", "vae")

    first, second = meta_vae(), meta_vae()
    identity = adapters.ComfyVaeImageEncoder(first, origin("1")).identity
    assert adapters.ComfyVaeImageEncoder(second, origin("17")).identity == identity  # same file, ids renumbered
    assert adapters.ComfyVaeImageEncoder(first, origin("1", "other.safetensors")).identity != identity
    os.utime(folder / "ae.safetensors", ns=(1, 1))
    assert adapters.ComfyVaeImageEncoder(first, origin("1")).identity != identity  # the file changed

    # Without the graph: newer ComfyUI's reload record (loader and file path), or this object for this session.
    alone = adapters.ComfyVaeImageEncoder(first).identity
    assert alone == adapters.ComfyVaeImageEncoder(first).identity != adapters.ComfyVaeImageEncoder(second).identity
    for vae in (first, second):
        vae.patcher.cached_patcher_init = (comfy.sd.VAE, (str(folder / "ae.safetensors"),))
    assert adapters.ComfyVaeImageEncoder(first).identity == adapters.ComfyVaeImageEncoder(second).identity
