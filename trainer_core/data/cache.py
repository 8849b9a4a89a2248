"""On-disk caches of text embeddings and VAE latents, keyed by a hash of everything that changes the result.

One safetensors file per caption / per (image, crop, bucket). A second run over the same data finds every file and
calls no encoder. Files are written under a temporary name and renamed into place, so an interrupted run never
leaves a half-written entry under a real name.

The caches depend only on two small protocols, so ComfyUI's own CLIP and VAE objects can fill them through adapters
without the core importing ComfyUI.

Every entry carries a SHA-256 of its tensors in its metadata. Reading an entry checks it; a truncated or damaged
entry found while filling is deleted and encoded again (counted in `CacheStats.rebuilt`), one found while training
is deleted and reported with what to do. Two processes may fill one cache folder at once: each publishes through
its own temporary file and an atomic rename, and both write identical bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from ..util.atomic import file_sha256, write_with

from .datasets import TrainingSample, display_path, load_sample_pixels
from ..util.faults import crash_point
from ..hidream.embeds import PromptEmbeds

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3  # 2: entries carry a checksum of their tensors; 3: latent keys name no file path


class TextEncoder(Protocol):
    """Anything that turns captions into HiDream conditioning. One that also has `encode_many(captions,
    batch_size, max_sequence_length)` -> iterator of (captions, PromptEmbeds) fills a cache through it
    (hidream.StagedTextEncoders)."""

    identity: str

    def encode(self, prompts: list[str], max_sequence_length: int = 128) -> PromptEmbeds: ...


class ImageEncoder(Protocol):
    """Anything that turns pixels (B, 3, H, W) in [-1, 1] into scaled latents (B, 16, H/8, W/8)."""

    identity: str

    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor: ...


def content_hash(fields: dict) -> str:
    payload = json.dumps({"v": CACHE_FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CacheEntryCorrupt(RuntimeError):
    """A cache file that cannot be trusted (unreadable, truncated, or its tensors do not match its checksum)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cache entry {path} is corrupt: {reason}")
        self.path = path
        self.reason = reason


def _tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, "sha256": _tensors_checksum(tensors)}
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata))


def _header(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    if len(data) < 8 or header_len <= 0 or 8 + header_len > len(data):
        raise ValueError("header is cut off")
    return json.loads(data[8:8 + header_len])


def read_entry(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one cache entry, after checking them against the checksum written with them.

    The file is read into memory rather than memory-mapped: a mapped file that something else truncates would
    crash the process (SIGBUS) instead of raising.
    """
    try:
        data = Path(path).read_bytes()
        expected = (_header(data).get("__metadata__") or {}).get("sha256")
        tensors = safetensors_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise CacheEntryCorrupt(path, f"unreadable ({exc})") from exc
    if expected is None or expected != _tensors_checksum(tensors):
        raise CacheEntryCorrupt(path, "its tensors do not match the checksum written with them")
    return tensors


def entry_is_complete(path: Path) -> bool:
    """Cheap structural check without reading the tensors: the header parses and the file is exactly as long as
    the header says (catches truncation; `read_entry` catches everything else when the entry is used)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            header = _header(head + f.read(int.from_bytes(head, "little")))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + int.from_bytes(head, "little") + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _discard(path: Path, reason: str) -> None:
    logger.warning("cache entry %s is damaged (%s): deleting it and encoding it again", path, reason)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encoder_calls: int = 0
    rebuilt: int = 0  # damaged entries found, deleted and encoded again (also counted in misses)

    def __str__(self) -> str:
        rebuilt = f", {self.rebuilt} damaged entries rebuilt" if self.rebuilt else ""
        return f"{self.hits} cached, {self.misses} encoded in {self.encoder_calls} encoder calls{rebuilt}"


def _encoded_batches(encoder: TextEncoder, captions: list[str], batch_size: int, max_sequence_length: int
                     ) -> Iterator[tuple[list[str], PromptEmbeds]]:
    """(captions, embeds) batch by batch: through the encoder's own `encode_many` where it has one (HiDream's
    staged encoders bring one encoder at a time to the device for many captions), else `encode` per batch."""
    if not captions:
        return
    if hasattr(encoder, "encode_many"):
        yield from encoder.encode_many(captions, batch_size, max_sequence_length)
        return
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        yield chunk, encoder.encode(chunk, max_sequence_length=max_sequence_length)


class TextEmbeddingCache:
    """Per-caption HiDream text conditioning: t5 (128, D_t5), llama (L, 128, D_llama), pooled (D_pooled,)."""

    def __init__(self, cache_dir: Path, encoder_identity: str, max_sequence_length: int = 128):
        self.cache_dir = Path(cache_dir)
        self.encoder_identity = encoder_identity
        self.max_sequence_length = max_sequence_length
        self.stats = CacheStats()

    def path_for(self, caption: str) -> Path:
        key = content_hash({"caption": caption, "encoder": self.encoder_identity,
                            "max_sequence_length": self.max_sequence_length})
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The distinct captions (the empty one included) that have no complete cache entry."""
        return [c for c in dict.fromkeys(["", *captions]) if not entry_is_complete(self.path_for(c))]

    def fill(self, captions: Iterable[str], encoder: Optional[TextEncoder], batch_size: int = 8,
             progress: Optional[Callable[[int, int], None]] = None) -> CacheStats:
        """Encode every caption not yet cached. The empty caption is always cached (caption dropout uses it).

        `encoder` may be None when the caller knows (from `missing`) that everything is cached already.
        """
        unique = list(dict.fromkeys(["", *captions]))
        missing = self.missing(unique)
        for caption in missing:
            if self.path_for(caption).exists():
                _discard(self.path_for(caption), "truncated")
                self.stats.rebuilt += 1
        if missing and encoder is None:
            raise ValueError(f"{len(missing)} captions are not cached and no text encoder was given")
        self.stats.hits += len(unique) - len(missing)
        done = 0
        for chunk, embeds in _encoded_batches(encoder, missing, batch_size, self.max_sequence_length):
            self.stats.encoder_calls += 1
            self.stats.misses += len(chunk)
            for i, caption in enumerate(chunk):
                one = embeds.select(i)
                _atomic_save({"t5": one.t5[0], "llama": one.llama[:, 0], "pooled": one.pooled[0]},
                             self.path_for(caption), {"caption": caption[:4096], "encoder": self.encoder_identity})
                crash_point("text-cache-write")
            done += len(chunk)
            if progress:
                progress(done, len(missing))
        return self.stats

    def load(self, captions: Sequence[str]) -> PromptEmbeds:
        """Batched conditioning for `captions`: t5 (B, 128, D), llama (L, B, 128, D), pooled (B, D)."""
        items = []
        for caption in captions:
            path = self.path_for(caption)
            if not path.is_file():
                raise KeyError(f"caption not in the text cache (fill() it first): {caption[:80]!r}")
            try:
                t = read_entry(path)
            except CacheEntryCorrupt as exc:
                path.unlink(missing_ok=True)
                raise CacheEntryCorrupt(path, f"{exc.reason}. It was deleted; start the run again (with "
                                              "resume_from_checkpoint: latest) to encode it anew") from exc
            items.append(PromptEmbeds(t5=t["t5"][None], llama=t["llama"][:, None], pooled=t["pooled"][None]))
        return PromptEmbeds.cat(items)


class VaeImageEncoder:
    """Adapter from a diffusers AutoencoderKL to the ImageEncoder protocol.

    The latent is a sample of the VAE's posterior, as HiDream's trainers use, but drawn with one generator per image
    (seeded from its cache key), so a latent never depends on which other images shared its batch.
    """

    def __init__(self, vae, identity: str):
        self.vae = vae
        self.identity = identity

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        vae = self.vae
        param = next(vae.parameters())
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g, dtype=torch.float32)
                           for g in generators]).to(dist.mean.device)
        latents = dist.mean.float() + dist.std.float() * eps
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor


class LatentCache:
    """Per-sample VAE latents (16, H/8, W/8), keyed by image bytes, resize, crop, bucket and VAE identity (never by
    the file's path)."""

    def __init__(self, cache_dir: Path, encoder_identity: str):
        self.cache_dir = Path(cache_dir)
        self.encoder_identity = encoder_identity
        self.stats = CacheStats()
        self.encoder: Optional[ImageEncoder] = None  # set by fill(); re-encodes an entry found damaged later
        self._keys: dict[tuple, str] = {}

    def key_for(self, sample: TrainingSample) -> str:
        memo = (str(sample.image_path), sample.bucket, sample.resize_to, sample.crop)
        if memo not in self._keys:
            self._keys[memo] = content_hash({"image_sha256": file_sha256(sample.image_path),
                                             "sample": sample.cache_key_fields(), "vae": self.encoder_identity})
        return self._keys[memo]

    def path_for(self, sample: TrainingSample) -> Path:
        key = self.key_for(sample)
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def fill(self, samples: Iterable[TrainingSample], encoder: ImageEncoder, batch_size: int = 1,
             progress: Optional[Callable[[int, int], None]] = None) -> CacheStats:
        """Encode every sample not yet cached, `batch_size` images of one bucket per encoder call."""
        self.encoder = encoder
        unique = {self.path_for(s): s for s in samples}
        missing = []
        for path, sample in unique.items():
            if path.exists():
                try:
                    read_entry(path)  # latents are small: check every one fully
                    continue
                except CacheEntryCorrupt as exc:
                    _discard(path, exc.reason)
                    self.stats.rebuilt += 1
            missing.append(sample)
        self.stats.hits += len(unique) - len(missing)
        by_bucket: dict[tuple[int, int], list[TrainingSample]] = {}
        for s in missing:
            by_bucket.setdefault(s.bucket, []).append(s)
        done = 0
        for group in by_bucket.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                pixels = torch.stack([load_sample_pixels(s) for s in chunk])
                gens = [self._generator_for(s) for s in chunk]
                latents = encoder.encode(pixels, gens)
                self.stats.encoder_calls += 1
                self.stats.misses += len(chunk)
                self._save(chunk, latents)
                crash_point("latent-cache-write")
                done += len(chunk)
                if progress:
                    progress(done, len(missing))
        return self.stats

    def _save(self, samples: Sequence[TrainingSample], latents: torch.Tensor) -> None:
        for s, lat in zip(samples, latents):
            _atomic_save({"latents": lat.float()}, self.path_for(s),
                         {"image": display_path(s.image_path), "vae": self.encoder_identity})

    def _generator_for(self, sample: TrainingSample) -> torch.Generator:
        """The posterior-sampling generator of one image, seeded from its key: its latent never changes."""
        return torch.Generator().manual_seed(int(self.key_for(sample)[:15], 16))

    def _encode_again(self, sample: TrainingSample) -> None:
        self._save([sample], self.encoder.encode(load_sample_pixels(sample)[None], [self._generator_for(sample)]))
        self.stats.rebuilt += 1

    def load(self, samples: Sequence[TrainingSample]) -> torch.Tensor:
        """Latents of one bucket's batch, (B, 16, H/8, W/8) float32.

        An entry damaged since fill() is encoded again when the encoder is still at hand (same seed, same latent).
        """
        out = []
        for s in samples:
            path = self.path_for(s)
            try:
                if not path.is_file():
                    raise KeyError(f"image not in the latent cache (fill() it first): {display_path(s.image_path)}")
                out.append(read_entry(path)["latents"])
            except CacheEntryCorrupt as exc:
                path.unlink(missing_ok=True)
                if self.encoder is None:
                    raise CacheEntryCorrupt(path, f"{exc.reason}. It was deleted; start the run again to encode "
                                                  "it anew") from exc
                logger.warning("%s: encoding it again", exc)
                self._encode_again(s)
                out.append(read_entry(path)["latents"])
        return torch.stack(out)
