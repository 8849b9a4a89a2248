"""Data-parallel and FSDP training on 2 CPU processes (gloo), launched with torchrun as users launch it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import write_lycoris_config, write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red"), ("circle", "green", "blue"), ("square", "red", "yellow")]
LOKR = "pytorch_lora_weights.safetensors"


def write_config(folder: Path, model_dir: Path, data: Path, name: str, **overrides) -> Path:
    values = {"model_family": "hidream", "pretrained_model_name_or_path": str(model_dir),
              "output_dir": str(folder / name), "cache_dir": str(folder / f"{name}-cache"),
              "lycoris_config": str(write_lycoris_config(folder / "lycoris.json")),
              "data_backend_config": str(folder / "multidatabackend.json"), "max_train_steps": 4,
              "learning_rate": "1e-3", "train_batch_size": 1, "seed": 3, "mixed_precision": "no",
              "caption_dropout_probability": 0.3, "report_to": "none", "device": "cpu",
              "distributed_timeout_seconds": 60, **overrides}
    (folder / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(data), "caption_strategy": "textfile",
         "resolution": 64, "crop": True, "crop_aspect": "square"}]))
    path = folder / f"{name}.json"
    path.write_text(json.dumps(values))
    return path


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def train_cmd(config: Path) -> list[str]:
    return ["-m", "trainer_core", "train", "--config", str(config)]


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_two_ranks_of_batch_one_equal_one_process_of_batch_two_and_cache_once(tiny_model_dir, tmp_path):
    data = write_shapes_dataset(tmp_path / "shapes", ITEMS)
    single = run([sys.executable, *train_cmd(write_config(tmp_path, tiny_model_dir, data, "single",
                                                          train_batch_size=2))])
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = run(torchrun(*train_cmd(write_config(tmp_path, tiny_model_dir, data, "ddp"))))
    assert ranks.returncode == 0, ranks.stderr[-4000:]
    error = max_diff(tmp_path / "single" / LOKR, tmp_path / "ddp" / LOKR)
    losses = [json.loads((tmp_path / name / "losses.json").read_text()) for name in ("single", "ddp")]
    loss_error = max(abs(a - b) for a, b in zip(*losses))
    print(f"\n2 ranks x batch 1 vs 1 process x batch 2: max abs LoKr difference {error:.3g}, loss {loss_error:.3g}")
    # Batch-1 and batch-2 matmuls round differently (~1e-7); Adam's normalised steps carry that into the weights
    # (seen: 2e-6 to 1.2e-5 after 4 steps at lr 1e-3, i.e. under 0.3% of what the weights moved).
    assert error < 1e-4 and loss_error < 1e-5
    assert "effective batch 2 = train_batch_size 1 x gradient_accumulation_steps 1 x 2 ranks" in ranks.stderr
    # Caches are written once: rank 0 encodes everything, rank 1 finds it all cached.
    assert "text cache (rank 1): 7 cached, 0 encoded" in ranks.stderr, ranks.stderr[-4000:]
    assert "latent cache (rank 1): 6 cached, 0 encoded" in ranks.stderr
    assert "text cache (rank 0): 0 cached, 7 encoded" in ranks.stderr
    assert not list((tmp_path / "ddp").glob("**/rank*"))  # nothing written per rank

    # accelerate's launcher sets the same environment (`--multi_gpu` also launches CPU processes).
    accelerate = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      *train_cmd(write_config(tmp_path, tiny_model_dir, data, "accelerate"))])
    assert accelerate.returncode == 0, accelerate.stderr[-4000:]
    assert max_diff(tmp_path / "ddp" / LOKR, tmp_path / "accelerate" / LOKR) == 0.0


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"rank {rank} not found")


def test_a_killed_rank_stops_the_job_and_both_ranks_resume_to_the_same_lokr(tiny_model_dir, tmp_path):
    data = write_shapes_dataset(tmp_path / "shapes", ITEMS)
    settings = dict(max_train_steps=10, checkpoint_step_interval=2, resume_from_checkpoint="latest", use_ema=True)
    reference = run(torchrun(*train_cmd(write_config(tmp_path, tiny_model_dir, data, "whole", **settings))))
    assert reference.returncode == 0, reference.stderr[-3000:]

    config = write_config(tmp_path, tiny_model_dir, data, "killed", **settings)
    launcher = subprocess.Popen(torchrun(*train_cmd(config)), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-4").is_dir():
        assert time.time() < deadline and launcher.poll() is None, "the run never reached checkpoint-4"
        time.sleep(0.1)
    _worker(launcher, 1).send_signal(signal.SIGKILL)
    killed_at = time.time()
    returncode = launcher.wait(timeout=120)  # the launcher stops the surviving rank: no hang
    print(f"\nkilled rank 1: the job stopped {time.time() - killed_at:.1f} s later (exit {returncode})")
    assert returncode != 0
    assert not (tmp_path / "killed" / LOKR).exists()

    resumed = run(torchrun(*train_cmd(config)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    for name in (LOKR, "pytorch_lora_weights_ema.safetensors"):
        error = max_diff(tmp_path / "whole" / name, tmp_path / "killed" / name)
        print(f"{name}: resumed vs uninterrupted 2-rank run, max abs difference {error:.3g}")
        assert error == 0.0


SHARDED_FORWARD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from trainer_core.training.distributed import DistributedContext, shard_frozen_base
    from trainer_core.adapters import load_lokr
    from trainer_core.hidream import PromptEmbeds, load_transformer, resolve_model_paths
    model_dir, lokr, out = sys.argv[1:4]
    ranks = DistributedContext.from_environment()
    ranks.start(torch.device("cpu"), 60)
    transformer = load_transformer(resolve_model_paths(model_dir), dtype=torch.float32)
    network = load_lokr(lokr, transformer)
    if ranks.enabled:
        shard_frozen_base(transformer)
    transformer.eval()
    cfg, g = transformer.config, torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    embeds = PromptEmbeds(t5=torch.randn(1, 128, cfg.caption_channels[0], generator=g),
                          llama=torch.randn(max(cfg.llama_layers) + 1, 1, 128, cfg.caption_channels[1], generator=g),
                          pooled=torch.randn(1, cfg.text_emb_dim, generator=g))
    with torch.no_grad():
        y = transformer(hidden_states=x, timesteps=torch.tensor([500.0]), encoder_hidden_states_t5=embeds.t5,
                        encoder_hidden_states_llama3=embeds.llama, pooled_embeds=embeds.pooled, return_dict=False)[0]
    if ranks.is_main:
        torch.save(y, out)
    ranks.stop()
""")


def test_fsdp_trains_validates_and_its_lokr_gives_the_sharded_models_outputs_on_one_process(tiny_model_dir,
                                                                                              tmp_path):
    data = write_shapes_dataset(tmp_path / "shapes", ITEMS)
    previews = dict(validation_prompt="a red circle on a blue background", validation_resolution="64x64",
                    validation_num_inference_steps=2, eval_steps_interval=3, num_eval_images=1)
    config = write_config(tmp_path, tiny_model_dir, data, "fsdp", distributed_mode="fsdp", max_train_steps=3,
                          **previews)
    trained = run(torchrun(*train_cmd(config)))
    assert trained.returncode == 0, trained.stderr[-4000:]
    # Validation and eval loss under FSDP: all ranks sample together, rank 0 writes.
    assert "step 3: eval loss" in trained.stderr
    base_image = Path("validation", "step_000000", "validation_64x64.png")
    for step in (0, 3):
        assert (tmp_path / "fsdp" / "validation" / f"step_{step:06d}" / "grid.png").is_file()
    alone = run([sys.executable, *train_cmd(write_config(tmp_path, tiny_model_dir, data, "fsdp-alone",
                                                         max_train_steps=1, **previews))])
    assert alone.returncode == 0, alone.stderr[-3000:]
    pixels = [np.asarray(Image.open(tmp_path / name / base_image), dtype=np.int16) for name in ("fsdp", "fsdp-alone")]
    pixel_error = int(np.abs(pixels[0] - pixels[1]).max())
    print(f"\nFSDP validation image (base model) vs one process: max pixel difference {pixel_error}")
    assert pixel_error <= 2  # float32 all-gathered vs local weights: the same image up to rounding
    lokr = tmp_path / "fsdp" / LOKR
    single = load_file(str(lokr))
    assert single and all(torch.isfinite(v).all() for v in single.values())

    script = tmp_path / "sharded_forward.py"
    script.write_text(SHARDED_FORWARD)
    sharded = run(torchrun(str(script), str(tiny_model_dir), str(lokr), str(tmp_path / "sharded.pt")))
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    alone = run([sys.executable, str(script), str(tiny_model_dir), str(lokr), str(tmp_path / "alone.pt")])
    assert alone.returncode == 0, alone.stderr[-4000:]
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("sharded.pt", "alone.pt"))
    error = (a - b).abs().max().item()
    print(f"\nFSDP-trained LoKr: sharded (2 ranks) vs one process, max abs output difference {error:.3g}")
    assert error < 1e-5


ROUTED_EXPERTS_RUN = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from trainer_core.config import load_train_config
    from trainer_core.hidream import load_transformer, resolve_model_paths
    from trainer_core.training import ModelComponents, TrainingCallbacks, train
    config_path, out = sys.argv[1:3]
    config = load_train_config(config_path)
    rank = int(os.environ["RANK"])
    transformer = load_transformer(resolve_model_paths(config.pretrained_model_name_or_path), dtype=torch.float32)
    # How many (token, slot) pairs each MoE layer routes to each expert, per training forward.
    gates = {module: name for name, module in transformer.named_modules() if type(module).__name__ == "MoEGate"}
    routed = []
    def count(gate, args, output):
        if torch.is_grad_enabled():  # a training forward (validation samples without grad)
            experts = gate.weight.shape[0]
            routed.append([gates[gate], torch.bincount(output[0].flatten(), minlength=experts).tolist()])
    for gate in gates:
        gate.register_forward_hook(count)
    # The LoKr of every expert Linear as this rank holds it after its last step (read from the hooked layers).
    def keep_weights(metrics):
        if metrics.step < metrics.total_steps:
            return
        weights = {}
        for name, module in transformer.named_modules():
            lokr = getattr(module.__dict__.get("forward"), "__self__", None)
            if ".experts." in name and type(lokr).__name__ == "LokrModule":
                weights.update({f"{name}.{k}": v.detach().clone() for k, v in lokr.named_parameters()})
        save_file(weights, f"{out}/rank{rank}.safetensors")
    train(config, callbacks=TrainingCallbacks(on_step=keep_weights), components=ModelComponents(transformer))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(routed, f)
""")


def test_a_rank_that_routes_no_token_to_a_lokr_expert_trains_on_in_step(tiny_model_dir, tmp_path):
    """A LoKr on the routed experts, 2 ranks, 32 px images (4 image tokens per sample in the double-stream blocks,
    each sent to 2 of 4 experts): at some step one rank routes nothing to an expert that carries a LoKr while the
    other rank does. DDP's reducer waits for a gradient of every parameter on every rank; the run must neither hang
    nor fail, and both ranks must end with the same LoKr."""
    data = write_shapes_dataset(tmp_path / "shapes", ITEMS, size=32)
    lycoris = tmp_path / "lycoris_experts.json"
    lycoris.write_text(json.dumps({"algo": "lokr", "linear_dim": 16384, "linear_alpha": 1, "full_matrix": True,
                                   "factor": 2, "apply_preset": {"name_algo_map": {"*.ff_i.experts.*": {"factor": 2}},
                                                                 "use_fnmatch": True}}))
    config = write_config(tmp_path, tiny_model_dir, data, "experts", lycoris_config=str(lycoris), max_train_steps=3,
                          caption_dropout_probability=0.0)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0]["resolution"] = 32
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    script = tmp_path / "routed_experts_run.py"
    script.write_text(ROUTED_EXPERTS_RUN)
    ranks = run(torchrun(str(script), str(config), str(tmp_path)), timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-4000:]

    routed = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(routed[0]) == len(routed[1]) > 0
    one_sided = [(i, layer, expert) for i, ((layer, a), (_, b)) in enumerate(zip(*routed))
                 for expert, (n0, n1) in enumerate(zip(a, b)) if (n0 == 0) != (n1 == 0)]
    print(f"\n(forward, MoE layer, expert) routed tokens on one rank only: {one_sided}")
    assert one_sided  # the case this test is about did happen
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and any(".experts." in k for k in weights[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for _, gate, expert in one_sided:  # each such expert's LoKr trained (W2 starts at zero), the same on both ranks
        prefix = gate.replace(".gate", f".experts.{expert}.")
        trained = [k for k in weights[0] if k.startswith(prefix) and k.endswith("lokr_w2")]
        assert len(trained) == 3 and all(weights[0][k].abs().max() > 0 for k in trained)
