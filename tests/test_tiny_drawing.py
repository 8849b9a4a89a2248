"""The drawing tiny HiDream: its VAE round-trips the demo's pictures, its transformer draws captions (also
colour-shape pairs it never saw together), the demo's LoKr makes a new concept visible in pixels, and the model is
built from the shipped weights the same way every time.

The VAE and the transformer's samples are judged against the corpus' exact drawing of the caption
(trainer_core/hidream/tiny/scoring.py); the demo's LoKr by the pink on the ring and the background in its hole.
"""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer_core.hidream import load_text_encoders, load_transformer, load_vae, resolve_model_paths
from trainer_core.hidream.tiny import DRAWING_RESOLUTION, DrawingModelError, build_drawing_model, corpus
from trainer_core.hidream.tiny.drawing import MANIFEST_FILE, WEIGHTS_DIR, read_manifest
from trainer_core.hidream.tiny.scoring import (HELD_OUT_CAPTIONS, SEEN_CAPTIONS, evaluation_groups, format_summary,
                                               sample_caption, score_groups)
from trainer_core.hidream.vae import vae_decode, vae_encode


@pytest.fixture(scope="module")
def drawing(drawing_model_dir):
    paths = resolve_model_paths(drawing_model_dir)
    return {"transformer": load_transformer(paths), "vae": load_vae(paths), "encoders": load_text_encoders(paths)}


def draw_caption(model, caption: str, network=None, strength: float = 1.0, seed: int = 0):
    return sample_caption(model["transformer"], model["vae"], model["encoders"], caption, seed, network, strength,
                          size=DRAWING_RESOLUTION)


def round_trip_errors(vae, scenes) -> torch.Tensor:
    batch = corpus.to_tensor(scenes)
    with torch.no_grad():
        decoded = vae_decode(vae, vae_encode(vae, batch, torch.Generator().manual_seed(0)))
    return ((decoded.float().clamp(-1, 1) - batch).abs() / 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_the_vae_round_trips_flat_shapes(drawing, size):
    """Encode then decode, pixel MAE in [0, 1] (the random model's VAE: 0.233): corpus scenes at every position
    within 0.03 at 64-256 px; the demo's concept (a thin pink ring, a shape the transformer never saw) within 0.03
    at 128 px (the demo's size) and above, 0.04 at 64 px, where the ring is 3 px thick (measured 0.031-0.035)."""
    from trainer_core.demo import draw_concept

    scenes = round_trip_errors(drawing["vae"], [item.draw(size) for item in corpus.all_items()[::97]])
    concept = round_trip_errors(drawing["vae"], [draw_concept(background, size=size)
                                                 for background in ("blue", "yellow", "black")])
    print(f"{size} px: pixel MAE of corpus scenes mean {scenes.mean():.4f}, worst {scenes.max():.4f}; of the "
          f"concept worst {concept.max():.4f}")
    assert float(scenes.max()) <= 0.03
    assert float(concept.max()) <= (0.03 if size >= 128 else 0.04)


def test_the_base_model_draws_its_captions(drawing):
    """32 captions seen in pretraining and 16 of the held-out colour-shape pairs (never in pretraining, in any
    background or place), one sample each at the shipped sampler settings (128 px, 20 steps, guidance 4, shift 3),
    scored against the scene drawn exactly (trainer_core/hidream/tiny/scoring.py): pixel error, the named background
    outside the shape, the named colour on the shape, and the shape itself (IoU with the captioned shape, and whether
    it matches the captioned shape better than each other corpus shape in that place)."""
    summaries = score_groups(drawing["transformer"], drawing["vae"], drawing["encoders"], evaluation_groups())
    for name, summary in summaries.items():
        print(format_summary(name, summary))
    every = {key: (summaries["seen"][key] * SEEN_CAPTIONS + summaries["held out"][key] * HELD_OUT_CAPTIONS)
             / (SEEN_CAPTIONS + HELD_OUT_CAPTIONS) for key in summaries["seen"]}
    every["captions"] = SEEN_CAPTIONS + HELD_OUT_CAPTIONS
    print(format_summary("all", every))
    # The aims were MAE <= 0.08, background >= 70 %, shape colour >= 50 %; the bounds sit between those and
    # what the shipped weights measure (seen 0.025 / 98 % / 89 % / IoU 0.86 / 97 %, held out 0.027 / 98 % / 80 % /
    # 0.81 / 100 %), so that a worse model fails.
    assert every["pixel_mae"] <= 0.05 and every["background_share"] >= 0.9 and every["shape_colour_share"] >= 0.75
    for name, summary in summaries.items():
        assert summary["pixel_mae"] <= 0.05, name
        assert summary["background_share"] >= 0.9 and summary["shape_colour_share"] >= 0.7, name
        assert summary["shape_iou"] >= 0.7 and summary["shape_recognised"] >= 0.75, name


def test_the_demo_teaches_a_new_concept_that_shows_in_pixels(drawing, tmp_path):
    """The demo as `python -m trainer_core demo` runs it: afterwards "a zorb on a blue background" (a place it was
    shown) and "... yellow background, at the bottom" (never shown) come out as a pink ring with its hole, more of
    it the higher the LoKr strength; the base model draws none (demo.ConceptCoverage says what each share counts)."""
    from trainer_core.adapters import load_lokr
    from trainer_core.demo import VALIDATION_SCENES, concept_caption, concept_coverage, run_demo

    out = run_demo(tmp_path / "demo")
    summary = json.loads((out / "demo_summary.json").read_text())
    assert Path(summary["before_after"]).is_file() and len(summary["validation_images"]) == 9  # 3 steps x (2 + grid)
    for name, by_step in summary["concept_coverage"].items():  # what the demo prints
        assert list(by_step) == ["0", "200", "400"], name
        before, after = by_step["0"], by_step["400"]
        assert before["pink"] <= 0.08 and before["ring"] <= 0.3, name
        assert after["ring"] >= 0.6 and after["hole"] >= 0.5 and after["pink"] >= 0.2, name
    model = dict(drawing, transformer=load_transformer(resolve_model_paths(out / "tiny-hidream")))  # LoKr'd copy
    network = load_lokr(Path(summary["lokr"]), model["transformer"])
    for background, position in VALIDATION_SCENES.values():
        caption = concept_caption(background, position)
        shares = [concept_coverage(draw_caption(model, caption, network, strength), background, position)
                  for strength in (0, 0.5, 1)]
        print(f"{caption!r}: ring drawn in pink / ring in pink itself / background in its hole / pink in the whole "
              f"picture at LoKr strength 0, 0.5, 1: "
              f"{[(round(c.ring, 3), round(c.pink, 3), round(c.hole, 3), round(c.picture, 3)) for c in shares]}")
        ring = [c.ring for c in shares]
        assert shares[0].pink <= 0.08 and ring[0] <= 0.3 and ring[2] >= 0.6
        assert ring[0] <= ring[1] + 0.02 and ring[1] <= ring[2] + 0.02
        assert shares[2].hole >= 0.5  # a ring with its hole, not a pink disk
        assert shares[2].pink >= 2 * shares[2].picture  # the pink lands where the ring is, not all over the picture


def test_the_model_is_built_the_same_every_time_and_checks_its_weights(drawing_model_dir, tmp_path):
    again = build_drawing_model(tmp_path / "again")
    names = sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(drawing_model_dir).as_posix() for p in drawing_model_dir.rglob("*")
                           if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(again, drawing_model_dir, names, shallow=False)
    assert mismatch == [] and errors == []
    assert build_drawing_model(again) == again  # a folder already built from these weights is reused as it is

    damaged = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, damaged)
    weights = damaged / read_manifest(damaged)["file"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DrawingModelError, match="sha256"):
        build_drawing_model(tmp_path / "from_damaged", weights_dir=damaged)
    (damaged / MANIFEST_FILE).unlink()
    with pytest.raises(DrawingModelError, match="pretrain-tiny-model"):
        build_drawing_model(tmp_path / "no_manifest", weights_dir=damaged)


def test_pretraining_gives_the_same_bytes_in_two_processes(tmp_path):
    """`pretrain-tiny-model` (a few steps of each stage) in two fresh processes writes byte-identical weights: the
    tokenizers, both stages and the file are deterministic (tokenizers' own BPE trainer was not, across processes)."""
    import json
    import subprocess
    import sys

    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        done = subprocess.run([sys.executable, "-m", "trainer_core", "pretrain-tiny-model", "--out", str(out),
                               "--quick", "2"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        digests.append(json.loads((out / MANIFEST_FILE).read_text())["sha256"])
    assert digests[0] == digests[1]
    assert filecmp.cmp(tmp_path / "a" / read_manifest(tmp_path / "a")["file"],
                       tmp_path / "b" / read_manifest(tmp_path / "b")["file"], shallow=False)
