"""A tiny but complete HiDream-I1 model folder, built on the spot for tests and smoke runs.

`build_tiny_model` writes a diffusers-layout folder that `HiDreamImagePipeline.from_pretrained` accepts and that the
trainer loads through exactly the same code as the real HiDream-I1-Full:

    model_index.json
    transformer/                     HiDreamImageTransformer2DModel (same module tree as the real one, narrower)
    vae/                             AutoencoderKL shaped like the Flux VAE (16 latent channels, /8, no quant convs)
    text_encoder/   + tokenizer/     CLIPTextModelWithProjection + CLIPTokenizer   ("CLIP-L")
    text_encoder_2/ + tokenizer_2/   CLIPTextModelWithProjection + CLIPTokenizer   ("CLIP-G")
    text_encoder_3/ + tokenizer_3/   T5EncoderModel + T5Tokenizer
    text_encoder_4/ + tokenizer_4/   LlamaForCausalLM + PreTrainedTokenizerFast (Llama-3.1 style)
    scheduler/                       UniPCMultistepScheduler configured for flow matching

Nothing is downloaded: the four tokenizers are trained here on a small generated English corpus, every model is a
real diffusers / transformers class with seeded random weights. Two builds with the same seed give identical files.
"""
from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import diffusers
import torch
from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel, UniPCMultistepScheduler
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from ..vae import FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR  # the real VAE's: the trainer reads vae.config


@dataclass(frozen=True)
class TinyHiDreamSizes:
    """Widths of the tiny model. The text widths differ from each other on purpose, so that feeding one encoder's
    output where another's belongs fails with a shape error instead of silently working."""

    # Transformer: inner width = heads * head_dim = 64, no narrower than a 2x2 patch of 16 latent channels (64
    # values), or the model could not even pass its input through; rope axes must sum to head_dim.
    num_layers: int = 2
    num_single_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (16, 8, 8)
    num_routed_experts: int = 4
    num_activated_experts: int = 2
    max_resolution: tuple[int, int] = (64, 64)
    # Text encoders.
    clip_l_width: int = 32
    clip_l_projection: int = 16
    clip_g_width: int = 32
    clip_g_projection: int = 24
    # HiDream's CLIPs are Long-CLIP (248 positions); the pipeline feeds them 128 tokens, so 77 would not do.
    clip_max_positions: int = 248
    t5_width: int = 32
    t5_layers: int = 2
    llama_width: int = 48
    llama_layers: int = 4
    llama_heads: int = 2
    llama_kv_heads: int = 1
    llama_intermediate: int = 64
    # VAE: four blocks -> downscale 8, like the Flux VAE.
    vae_block_out_channels: tuple[int, ...] = (16, 16, 16, 16)
    vae_norm_num_groups: int = 8
    latent_channels: int = 16
    # Tokenizer vocabulary targets (the trainers may stop earlier on a small corpus).
    bpe_vocab_size: int = 1000
    unigram_vocab_size: int = 600

    @property
    def text_emb_dim(self) -> int:
        """Width of the pooled embedding: CLIP-L projection + CLIP-G projection, as in the real model (768 + 1280)."""
        return self.clip_l_projection + self.clip_g_projection

    @property
    def transformer_llama_layers(self) -> list[int]:
        """One Llama layer index per transformer block, mirroring the real pattern ([0..31] then 31 repeated):
        the first blocks read one layer each, the remaining blocks all read the last layer."""
        num_blocks = self.num_layers + self.num_single_layers
        return [min(i, self.llama_layers - 1) for i in range(num_blocks)]


TINY_SIZES = TinyHiDreamSizes()


CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
LLAMA_BOS, LLAMA_END_OF_TEXT, LLAMA_EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def caption_corpus() -> list[str]:
    """A few hundred short captions about colours, shapes, objects and photo styles (deterministic, no randomness).

    Used only to train the tiny tokenizers, so that typical test captions split into sensible pieces."""
    colours = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "grey", "brown", "gold"]
    shapes = ["square", "circle", "triangle", "star", "hexagon", "cube", "sphere", "line", "rectangle", "heart"]
    objects = ["cat", "dog", "house", "tree", "car", "flower", "bird", "cup", "chair", "mountain", "river", "boat"]
    styles = ["photo", "painting", "drawing", "sketch", "render", "watercolour", "close-up photo", "illustration"]
    sizes = ["small", "large", "tiny", "big", "bright", "dark", "shiny", "wooden", "glass", "soft"]
    places = ["on a table", "in a forest", "at night", "under the sky", "in the city", "by the sea", "in a room"]

    captions: list[str] = []
    for i, (colour, shape) in enumerate(itertools.product(colours, shapes)):
        style = styles[i % len(styles)]
        captions.append(f"a {style} of a {colour} {shape}")
        background = colours[(i + 5) % len(colours)]
        captions.append(f"a {sizes[i % len(sizes)]} {colour} {shape} on a {background} background")
    for i, (colour, thing) in enumerate(itertools.product(colours, objects)):
        style = styles[(i * 5) % len(styles)]
        captions.append(f"{style} of the {colour} {thing} {places[i % len(places)]}, high quality")
        size, shape = sizes[(i * 3) % len(sizes)], shapes[i % len(shapes)]
        captions.append(f"A {size} {thing} next to {i % 9 + 1} {shape}s. Sharp focus!")
    for i, (style, place) in enumerate(itertools.product(styles, places)):
        thing, shape = objects[i % len(objects)], shapes[i % len(shapes)]
        captions.append(f"{style.capitalize()} of two {thing}s and a {shape} {place}")
    return captions


# ----------------------------------------------------------------------------------------------------- tokenizers


def _byte_to_unicode_table() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes, in CLIP's canonical order (printable
    ASCII and Latin-1 map to themselves, the rest to code points from 256 up)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    code_points = printable[:]
    byte_values = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


def learn_bpe_merges(corpus: list[str], pre_tokenizer: Tokenizer, max_merges: int, end_of_word: str = "",
                     min_frequency: int = 2) -> list[tuple[str, str]]:
    """Byte-level BPE merges of `corpus`, learned here rather than by `tokenizers`' BpeTrainer: that trainer breaks
    ties between equally frequent pairs in hash-map order, which differs from process to process, so two builds
    would get different vocabularies (and a pretrained model would read its captions wrongly). Here the most
    frequent pair wins and ties go to the lexicographically first pair.

    `pre_tokenizer` (a Tokenizer holding the normalizer and pre-tokenizer the real tokenizer uses) splits the text
    into byte-level words; `end_of_word` is appended to each word's last symbol (CLIP's "</w>")."""
    from collections import Counter

    words: Counter = Counter()
    for text in corpus:
        normalized = pre_tokenizer.normalizer.normalize_str(text) if pre_tokenizer.normalizer else text
        for word, _ in pre_tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            symbols = list(word)
            symbols[-1] += end_of_word
            words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        pair, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < min_frequency:
            break
        merges.append(pair)
        merged: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _write_clip_tokenizer(
    out_dir: Path, corpus: list[str], pad_token: str, max_length: int, vocab_size: int
) -> CLIPTokenizer:
    """Train a CLIP-style BPE and save it as the real CLIP tokenizers are: vocab.json + merges.txt (+ tokenizer.json).

    The vocabulary is laid out like OpenAI CLIP's: 256 byte symbols, the same 256 with "</w>", one entry per merge,
    then <|startoftext|> and <|endoftext|> last (highest ids)."""
    trainer_model = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    # Same text handling as transformers' CLIPTokenizer, so the learned merges match what it will see.
    trainer_model.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    symbols = _byte_to_unicode_table()
    # 256 byte symbols, the same with "</w>", the merges, then the two specials: vocab_size in all.
    learned_merges = learn_bpe_merges(corpus, trainer_model, vocab_size - 2 * len(symbols) - 2, end_of_word="</w>")
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for left, right in learned_merges:
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    for token in (CLIP_BOS, CLIP_EOS):
        vocab[token] = len(vocab)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")

    # save_pretrained adds tokenizer.json + tokenizer_config.json; the two files above alone load to the same
    # tokenizer (tests check), as for real CLIP folders that predate tokenizer.json.
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=pad_token,
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _write_t5_tokenizer(out_dir: Path, corpus: list[str], vocab_size: int) -> T5Tokenizer:
    """Train a SentencePiece-style Unigram tokenizer laid out like T5's (<pad>=0, </s>=1, <unk>=2, 100 sentinels)."""
    trainer_model = Tokenizer(models.Unigram())
    # transformers' T5Tokenizer rebuilds its backend with this pre-tokenizer on load, so train with the same one.
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[T5_PAD, T5_EOS, T5_UNK],
        unk_token=T5_UNK,
        show_progress=False,
    )
    trainer_model.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_model.to_str())["model"]["vocab"]

    # Two things in the trainer's output depend on hash-map iteration order and would make builds differ: the order
    # of equal-score pieces, and the last few pieces (the characters it must keep), whose scores are the minimum
    # minus 1e-4 per piece in iteration order. So give that tail (plus any character the corpus lacks) one shared
    # lower score, round the learned scores, and order everything by (score, text).
    specials = {T5_PAD, T5_EOS, T5_UNK}
    pieces = {piece: float(score) for piece, score in trained if piece not in specials}
    tail_limit = min(pieces.values()) + 0.01
    kept_chars = [piece for piece, score in pieces.items() if score <= tail_limit]
    scores = {piece: round(score, 4) for piece, score in pieces.items() if score > tail_limit}
    floor = round(min(scores.values()) - 1.0, 2)
    for char in kept_chars + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?-'\"()"):
        scores.setdefault(char, floor)
    ordered = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    # T5's layout: <pad>=0, </s>=1, <unk>=2 (transformers' T5Tokenizer hard-codes unk_id=2).
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)] + ordered

    tokenizer = T5Tokenizer(vocab=vocab, eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD, extra_ids=100,
                            model_max_length=512)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _write_llama_tokenizer(out_dir: Path, corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a Llama-3-style byte-level BPE: BOS prepended by the post-processor, <|eot_id|> as eos, no pad token
    (HiDreamImagePipeline sets pad = eos itself)."""
    splitter = Tokenizer(models.BPE())
    splitter.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    symbols = _byte_to_unicode_table()
    merges = learn_bpe_merges(corpus, splitter, vocab_size - len(symbols) - 3)
    vocab = {token: i for i, token in enumerate(symbols)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Added after training so that, as in Llama 3, the special tokens get the highest ids.
    backend.add_special_tokens([LLAMA_BOS, LLAMA_END_OF_TEXT, LLAMA_EOT])
    bos_id = backend.token_to_id(LLAMA_BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A",
        pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B",
        special_tokens=[(LLAMA_BOS, bos_id)],
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOT,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 records its internal class name ("TokenizersBackend"); the real Llama-3.1 folder says
    # "PreTrainedTokenizerFast", and loading must go through that same path.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_text = json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    config_path.write_text(config_text, encoding="utf-8")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------- models


def _clip_text_encoder(
    tokenizer: CLIPTokenizer, width: int, projection: int, max_positions: int
) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        hidden_act="quick_gelu",
        # The real configs carry the legacy eos id 2 (argmax pooling); the true id selects the same token here because
        # the specials have the highest ids, and it stays correct when the pad token is not the eos token (CLIP-G).
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def _t5_encoder(tokenizer: T5Tokenizer, sizes: TinyHiDreamSizes) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=sizes.t5_width,
        d_kv=sizes.t5_width // 2,
        d_ff=2 * sizes.t5_width,
        num_layers=sizes.t5_layers,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as used by HiDream
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _llama(tokenizer: PreTrainedTokenizerFast, sizes: TinyHiDreamSizes) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.llama_width,
        intermediate_size=sizes.llama_intermediate,
        num_hidden_layers=sizes.llama_layers,
        num_attention_heads=sizes.llama_heads,
        num_key_value_heads=sizes.llama_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # as Llama-3.1-8B
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(LLAMA_END_OF_TEXT), tokenizer.eos_token_id],
    )
    return LlamaForCausalLM(config)


def _transformer(sizes: TinyHiDreamSizes) -> HiDreamImageTransformer2DModel:
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        num_layers=sizes.num_layers,
        num_single_layers=sizes.num_single_layers,
        attention_head_dim=sizes.attention_head_dim,
        num_attention_heads=sizes.num_attention_heads,
        caption_channels=[sizes.t5_width, sizes.llama_width],
        text_emb_dim=sizes.text_emb_dim,
        num_routed_experts=sizes.num_routed_experts,
        num_activated_experts=sizes.num_activated_experts,
        axes_dims_rope=list(sizes.axes_dims_rope),
        max_resolution=list(sizes.max_resolution),
        llama_layers=sizes.transformer_llama_layers,
    )
    # diffusers 0.42.1 leaves every HiDream layer at PyTorch's default (non-zero) init, so the output is already
    # non-trivial; should a future version zero-init the output head (as DiT-style models often do), give it small
    # seeded values so that LoRA/LoKr gradients still reach the adapters and the sampler output is not constant.
    final = transformer.final_layer.linear
    if not final.weight.any():
        torch.nn.init.normal_(final.weight, std=0.02)
    return transformer


def _vae(sizes: TinyHiDreamSizes) -> AutoencoderKL:
    depth = len(sizes.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=sizes.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=sizes.latent_channels,
        norm_num_groups=sizes.vae_norm_num_groups,
        sample_size=128,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _scheduler() -> UniPCMultistepScheduler:
    # HiDream-I1-Full ships UniPC in flow-matching mode; these three keys are what turn it into a flow sampler.
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


MODEL_INDEX_COMPONENTS: dict[str, list[str]] = {
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "text_encoder_4": ["transformers", "LlamaForCausalLM"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5Tokenizer"],
    "tokenizer_4": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "HiDreamImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_tiny_model(out_dir: Path, seed: int = 0, sizes: TinyHiDreamSizes = TINY_SIZES) -> Path:
    """Write a complete tiny HiDream-I1 diffusers folder with seeded *random* weights into `out_dir` (replacing it)
    and return `out_dir`. It cannot draw (see `build_drawing_model` for the pretrained one that does); tests that
    need only the real code paths, shapes and speed use it.

    Every model is created right after `torch.manual_seed(seed)`, so the weights depend only on `seed` and `sizes`.
    The CPU torch RNG state is saved and restored, so building does not disturb a caller's randomness.
    Size: about 5 MB; time: about a second on a laptop CPU.
    """
    return write_model_folder(out_dir, seed=seed, sizes=sizes, corpus=caption_corpus())


def write_model_folder(
    out_dir: Path,
    seed: int,
    sizes: TinyHiDreamSizes,
    corpus: list[str],
    weights: Optional[dict[str, dict[str, torch.Tensor]]] = None,
) -> Path:
    """The folder writer behind both tiny models: tokenizers trained on `corpus`, each model created from `seed`
    (seeded random weights) and then, for every component named in `weights`, given those weights instead (loaded
    strictly, converted to float32). Writes into `out_dir`, replacing it."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    weights = weights or {}

    clip_l_tok = _write_clip_tokenizer(
        out_dir / "tokenizer", corpus, pad_token=CLIP_EOS, max_length=sizes.clip_max_positions,
        vocab_size=sizes.bpe_vocab_size,
    )
    # Mirrors the real pair: the CLIP-L tokenizer pads with <|endoftext|>, the CLIP-G (laion bigG) one with "!".
    clip_g_tok = _write_clip_tokenizer(
        out_dir / "tokenizer_2", corpus, pad_token="!", max_length=sizes.clip_max_positions,
        vocab_size=sizes.bpe_vocab_size,
    )
    t5_tok = _write_t5_tokenizer(out_dir / "tokenizer_3", corpus, sizes.unigram_vocab_size)
    llama_tok = _write_llama_tokenizer(out_dir / "tokenizer_4", corpus, sizes.bpe_vocab_size)

    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "text_encoder": partial(
            _clip_text_encoder, clip_l_tok, sizes.clip_l_width, sizes.clip_l_projection, sizes.clip_max_positions
        ),
        "text_encoder_2": partial(
            _clip_text_encoder, clip_g_tok, sizes.clip_g_width, sizes.clip_g_projection, sizes.clip_max_positions
        ),
        "text_encoder_3": partial(_t5_encoder, t5_tok, sizes),
        "text_encoder_4": partial(_llama, llama_tok, sizes),
        "transformer": partial(_transformer, sizes),
        "vae": partial(_vae, sizes),
    }
    unknown = set(weights) - set(builders)
    if unknown:
        raise ValueError(f"weights given for unknown components {sorted(unknown)}")
    # Models are built on the CPU, so seeding the CPU generator (as torch.manual_seed does, minus its CUDA side
    # effect) fixes every weight; fork_rng puts the caller's generator state back afterwards.
    with torch.random.fork_rng(devices=[]):
        for name, build in builders.items():
            torch.default_generator.manual_seed(seed)
            model = build()
            if name in weights:
                state = {key: value.to(torch.float32) for key, value in weights[name].items()}
                model.load_state_dict(state, strict=True)
            model.save_pretrained(out_dir / name, safe_serialization=True)
    _scheduler().save_pretrained(out_dir / "scheduler")

    model_index = {"_class_name": "HiDreamImagePipeline", "_diffusers_version": diffusers.__version__}
    model_index.update(MODEL_INDEX_COMPONENTS)
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n", encoding="utf-8")
    return out_dir
