"""Tests of the tiny HiDream folder and of the one loading path (trainer_core.hidream.models), with real classes only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import HiDreamImagePipeline, UniPCMultistepScheduler
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from trainer_core.config import ConfigError
from trainer_core.hidream import (
    HiDreamModelPaths,
    PromptEmbeds,
    component_identity,
    load_scheduler,
    load_text_encoders,
    load_transformer,
    load_vae,
    resolve_model_paths,
    vae_decode,
    vae_encode,
)
from trainer_core.hidream.tiny import TINY_SIZES, build_tiny_model

PROMPTS = ["a red square", ""]
SUBFOLDERS = [
    "transformer", "vae", "scheduler",
    "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
    "text_encoder_3", "tokenizer_3", "text_encoder_4", "tokenizer_4",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "hidream", seed=0)


@pytest.fixture(scope="session")
def model_paths(tiny_dir) -> HiDreamModelPaths:
    return resolve_model_paths(tiny_dir)


@pytest.fixture(scope="session")
def pipeline(tiny_dir) -> HiDreamImagePipeline:
    return HiDreamImagePipeline.from_pretrained(tiny_dir, local_files_only=True)


@pytest.fixture(scope="session")
def encoders(model_paths):
    return load_text_encoders(model_paths)


@pytest.fixture(scope="session")
def embeds(encoders) -> PromptEmbeds:
    return encoders.encode(PROMPTS)


@pytest.fixture()
def tiny_copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


# ----------------------------------------------------------------------------------------------------- the folder


def test_folder_is_complete_and_small(tiny_dir):
    for name in SUBFOLDERS:
        assert (tiny_dir / name).is_dir(), name
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "HiDreamImagePipeline"
    assert "_diffusers_version" in index
    assert index["transformer"] == ["diffusers", "HiDreamImageTransformer2DModel"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_4"] == ["transformers", "PreTrainedTokenizerFast"]
    assert set(SUBFOLDERS) <= set(index)
    total = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert total < 20 * 1024 * 1024
    # The CLIP tokenizers are stored the way the real ones are.
    for name in ("tokenizer", "tokenizer_2"):
        assert (tiny_dir / name / "vocab.json").is_file() and (tiny_dir / name / "merges.txt").is_file()


def test_build_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    for weights in sorted(tiny_dir.rglob("*.safetensors")):
        first, second = load_file(weights), load_file(again / weights.relative_to(tiny_dir))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{weights.relative_to(tiny_dir)}:{key}"
    for text_file in sorted(tiny_dir.rglob("*.json")) + sorted(tiny_dir.rglob("*.txt")):
        assert text_file.read_bytes() == (again / text_file.relative_to(tiny_dir)).read_bytes(), text_file.name

    other = build_tiny_model(tmp_path / "other", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tiny_dir / name), load_file(other / name)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "rng", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_transformer_has_the_real_module_tree(model_paths):
    transformer = load_transformer(model_paths)
    modules = dict(transformer.named_modules())
    for name in [
        "double_stream_blocks.0.block.attn1.to_q",
        "double_stream_blocks.0.block.attn1.to_q_t",
        "double_stream_blocks.0.block.ff_i.experts.3.w2",
        "double_stream_blocks.0.block.ff_i.gate",
        "double_stream_blocks.0.block.ff_t.w1",
        "single_stream_blocks.3.block.attn1.to_out",
        "single_stream_blocks.3.block.ff_i.shared_experts.w1",
        "caption_projection.0.linear",
        "caption_projection.6.linear",  # one per block (2 + 4) for the Llama layers, then the T5 one
        "final_layer.linear",
    ]:
        assert name in modules, name
    assert type(modules["double_stream_blocks.0.block.attn1"]).__name__ == "HiDreamAttention"
    assert type(modules["single_stream_blocks.0.block.attn1"]).__name__ == "HiDreamAttention"
    config = transformer.config
    assert config.llama_layers == [0, 1, 2, 3, 3, 3]
    assert config.caption_channels == [TINY_SIZES.t5_width, TINY_SIZES.llama_width]
    assert config.text_emb_dim == TINY_SIZES.text_emb_dim
    assert sum(config.axes_dims_rope) == config.attention_head_dim


# ---------------------------------------------------------------------------------------- pipeline compatibility


def test_diffusers_pipeline_loads_the_folder(pipeline):
    assert type(pipeline.transformer).__name__ == "HiDreamImageTransformer2DModel"
    assert type(pipeline.vae).__name__ == "AutoencoderKL"
    assert type(pipeline.text_encoder_4).__name__ == "LlamaForCausalLM"
    assert type(pipeline.tokenizer_3).__name__ == "T5Tokenizer"
    assert isinstance(pipeline.scheduler, UniPCMultistepScheduler)
    assert pipeline.vae_scale_factor == 8


def test_tokenizers_pad_to_128_as_the_pipeline_does(pipeline, tiny_dir):
    # Same calls as HiDreamImagePipeline._get_{clip,t5,llama3}_prompt_embeds.
    for tokenizer, max_length in [
        (pipeline.tokenizer, min(128, 218)),
        (pipeline.tokenizer_2, min(128, 218)),
        (pipeline.tokenizer_3, min(128, pipeline.tokenizer_3.model_max_length)),
        (pipeline.tokenizer_4, min(128, pipeline.tokenizer_4.model_max_length)),
    ]:
        ids = tokenizer(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        assert ids.input_ids.shape == (2, 128), type(tokenizer).__name__
        assert len(tokenizer("a red square").input_ids) < 10, "the trained vocabulary should cover test captions"

    clip_l, clip_g, t5, llama = pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3, pipeline.tokenizer_4
    assert clip_l.pad_token == "<|endoftext|>" and clip_g.pad_token == "!"
    assert clip_l("a red square").input_ids[0] == clip_l.bos_token_id
    assert clip_l("a red square").input_ids[-1] == clip_l.eos_token_id
    assert t5("a red square").input_ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert llama.bos_token == "<|begin_of_text|>" and llama.eos_token == "<|eot_id|>"
    assert llama("a red square").input_ids[0] == llama.bos_token_id
    assert llama.pad_token == llama.eos_token  # set by the pipeline, as with the real Llama
    saved = json.loads((tiny_dir / "tokenizer_4" / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") is None and saved["tokenizer_class"] == "PreTrainedTokenizerFast"

    # vocab.json + merges.txt alone (no tokenizer.json) load to the same CLIP tokenizer.
    from_files = CLIPTokenizer(vocab=str(tiny_dir / "tokenizer" / "vocab.json"),
                               merges=str(tiny_dir / "tokenizer" / "merges.txt"))
    caption = "A close-up photo of 3 Blue circles, zzq!"
    assert from_files(caption).input_ids == clip_l(caption).input_ids


def test_text_encoders_match_the_pipeline(pipeline, embeds):
    b, seq = len(PROMPTS), 128
    assert embeds.t5.shape == (b, seq, TINY_SIZES.t5_width)
    assert embeds.llama.shape == (TINY_SIZES.llama_layers, b, seq, TINY_SIZES.llama_width)
    assert embeds.pooled.shape == (b, TINY_SIZES.text_emb_dim)

    with torch.no_grad():
        t5, _, llama, _, pooled, _ = pipeline.encode_prompt(
            prompt=PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=128
        )
    # The pipeline runs LlamaForCausalLM, load_text_encoders a bare LlamaModel: the hidden states must agree.
    torch.testing.assert_close(embeds.t5, t5)
    torch.testing.assert_close(embeds.llama, llama)
    torch.testing.assert_close(embeds.pooled, pooled)
    assert not torch.equal(embeds.pooled[0], embeds.pooled[1])


def test_transformer_forward_gives_nonzero_text_dependent_output(model_paths, embeds):
    transformer = load_transformer(model_paths).eval()
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    with torch.no_grad():
        for index in range(embeds.batch_size):
            one = embeds.select(index)
            out = transformer(
                hidden_states=latents,
                timesteps=torch.tensor([500.0]),
                encoder_hidden_states_t5=one.t5,
                encoder_hidden_states_llama3=one.llama,
                pooled_embeds=one.pooled,
                return_dict=False,
            )[0]
            outputs.append(out)
    assert outputs[0].shape == (1, 16, 32, 32)
    assert torch.isfinite(outputs[0]).all() and outputs[0].abs().mean() > 1e-3
    assert not torch.allclose(outputs[0], outputs[1]), "the caption should change the prediction"


# --------------------------------------------------------------------------------------------- loading variants


def test_separate_llama_dir_gives_identical_embeddings(tiny_dir, tmp_path, encoders, embeds):
    llama_dir = tmp_path / "Llama-3.1-8B-Instruct"
    llama_dir.mkdir()
    for sub in ("text_encoder_4", "tokenizer_4"):
        for file in (tiny_dir / sub).iterdir():
            shutil.copy2(file, llama_dir / file.name)
    model_dir = tmp_path / "HiDream-I1-Full"
    model_dir.mkdir()
    for entry in tiny_dir.iterdir():
        if entry.name not in ("text_encoder_4", "tokenizer_4"):
            (model_dir / entry.name).symlink_to(entry)

    with pytest.raises(ConfigError, match="text_encoder_4.*--llama"):
        resolve_model_paths(model_dir)
    paths = resolve_model_paths(model_dir, llama_dir=llama_dir)
    assert paths.llama_dir == llama_dir
    separate = load_text_encoders(paths)
    torch.testing.assert_close(separate.encode(PROMPTS).llama, embeds.llama, rtol=0, atol=0)
    # Same files, other layout: the cache key must not change.
    assert separate.identity == encoders.identity


def test_missing_pieces_give_config_errors(tiny_copy, tmp_path):
    shutil.rmtree(tiny_copy / "vae")
    with pytest.raises(ConfigError, match=r"vae/config\.json"):
        resolve_model_paths(tiny_copy)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_paths(tmp_path / "nowhere")
    # A run with cached embeddings needs no text encoders, but still the VAE.
    shutil.rmtree(tiny_copy / "text_encoder_3")
    with pytest.raises(ConfigError, match="vae/"):
        resolve_model_paths(tiny_copy, require_text_encoders=False)


def test_llama_dir_must_hold_model_and_tokenizer(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_paths(tiny_dir, llama_dir=tmp_path / "missing")
    only_model = tmp_path / "only_model"
    shutil.copytree(tiny_dir / "text_encoder_4", only_model)
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        resolve_model_paths(tiny_dir, llama_dir=only_model)


def test_corrupt_weights_give_config_error(tiny_copy):
    (tiny_copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="transformer"):
        load_transformer(resolve_model_paths(tiny_copy))


def test_identity_is_stable_and_content_based(model_paths, encoders, tiny_copy):
    assert encoders.identity == load_text_encoders(model_paths).identity
    assert encoders.identity == load_text_encoders(resolve_model_paths(tiny_copy)).identity
    assert load_text_encoders(model_paths, dtype=torch.bfloat16).identity != encoders.identity
    before = component_identity(tiny_copy / "text_encoder_3")
    config_file = tiny_copy / "text_encoder_3" / "config.json"
    config = json.loads(config_file.read_text())
    config["dropout_rate"] = 0.5
    config_file.write_text(json.dumps(config))
    assert component_identity(tiny_copy / "text_encoder_3") != before


def test_free_releases_the_encoders(model_paths):
    loaded = load_text_encoders(model_paths)
    loaded.free()
    with pytest.raises(RuntimeError, match="freed"):
        loaded.encode(PROMPTS)


def test_scheduler_is_unipc_in_flow_mode(model_paths):
    scheduler = load_scheduler(model_paths)
    assert isinstance(scheduler, UniPCMultistepScheduler)
    assert scheduler.config.prediction_type == "flow_prediction"
    assert scheduler.config.use_flow_sigmas is True
    assert scheduler.config.flow_shift == 3.0


# ------------------------------------------------------------------------------------------------ VAE and embeds


def test_vae_encode_decode_shapes(model_paths):
    vae = load_vae(model_paths)
    assert vae.config.scaling_factor == pytest.approx(0.3611) and vae.config.shift_factor == pytest.approx(0.1159)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae_encode(vae, pixels, generator=torch.Generator().manual_seed(1))
    assert latents.shape == (1, 16, 8, 8)
    assert torch.equal(latents, vae_encode(vae, pixels, generator=torch.Generator().manual_seed(1)))
    decoded = vae_decode(vae, latents)
    assert decoded.shape == (1, 3, 64, 64)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_prompt_embeds_helpers(embeds):
    joined = PromptEmbeds.cat([embeds, embeds.select(0)])
    assert joined.batch_size == 3
    assert joined.llama.shape[1] == 3
    assert torch.equal(joined.select(2).llama, embeds.select(0).llama)
    assert torch.equal(embeds.select(-1).t5, embeds.t5[1:])
    with pytest.raises(IndexError):
        embeds.select(2)
    half = embeds.to(dtype=torch.bfloat16)
    assert half.t5.dtype == half.llama.dtype == half.pooled.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        PromptEmbeds(t5=embeds.t5, llama=embeds.llama[:, :1], pooled=embeds.pooled)
