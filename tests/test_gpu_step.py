"""The graph-capturable training step, on the CPU: no host read in the step (counted by dispatch), the non-finite
skip decided on the device and exact, the load-balancing loss' gradient attached in the graph, whole compiled
blocks (no graph break, one graph per block kind and input signature) computing the eager step, and no more saved
activations than the eager lean backward."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from trainer_core.adapters import LycorisConfig, create_lokr_network
from trainer_core.config.schema import StepSettings
from trainer_core.hidream import LoadBalancingLoss
from trainer_core.speedups import Speedups, apply_speedups
from trainer_core.training.guarded_update import GuardedUpdate, update_mode
from trainer_core.training.optimizers import optimizer_by_name
from trainer_core.training.step import MicroBatch, TrainStep
from trainer_core.util import HostSyncCounter

from conftest import random_conditioning
from test_speedups import _set_factors

ATTENTION_ONLY = LycorisConfig(factor=4)  # the default preset: the routed experts stay plain, so the MoE is grouped


class FixedNoise:
    """A NoiseSource with a fixed draw per step (set `step`)."""

    def __init__(self):
        self.step = 0

    def draw(self, latents):
        g = torch.Generator().manual_seed(100 + self.step)
        noise, sigmas = torch.randn(latents.shape, generator=g), torch.tensor([0.3, 0.8][: latents.shape[0]])
        return noise.to(latents.device), sigmas.to(latents.device)

    def get_state(self):
        return self.step

    def set_state(self, state):
        self.step = state


def _params_and_loss(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    return params, lambda: sum((p * p).sum() for p in params)


def _snapshot(optimizer, params, ema):
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
             for i, p in enumerate(params)},
            {k: v.clone() for k, v in ema.shadow.items()})


@pytest.mark.parametrize("name, mode", [("adamw", "found_inf"), ("optimi-lion", "snapshot"),
                                        ("optimi-adamw", "host")])
def test_a_non_finite_update_is_undone_exactly_on_the_device(name, mode):
    from trainer_core.adapters.ema import AdapterEMA

    params, loss_fn = _params_and_loss()
    holder = torch.nn.Module()
    holder.a, holder.b = params
    ema = AdapterEMA(holder, 0.9)
    optimizer = optimizer_by_name(name, params, 1e-2, 0.01)
    update = GuardedUpdate(optimizer, params, ema)
    assert update_mode(optimizer)[0] == mode == update.mode
    assert not update.on_device  # no state yet: the first update's skip is decided on the host

    def clip():
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, torch.nn.utils.get_total_norm([p.grad for p in params]))

    loss_fn().backward()
    update.step_on_host(True, clip)
    assert update.on_device == (mode != "host")
    if not update.on_device:
        return
    before = _snapshot(optimizer, params, ema)
    for p in params:
        p.grad = torch.full_like(p, math.nan)  # what a NaN step leaves
    with HostSyncCounter() as syncs:
        update.step(torch.tensor(False), clip)
    assert syncs.total == 0, syncs.by_op
    after = _snapshot(optimizer, params, ema)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(before[1][i][k], after[1][i][k]) for i in before[1] for k in before[1][i])
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    optimizer.zero_grad()
    loss_fn().backward()
    update.step(torch.tensor(True), clip)  # and a finite one updates weights, state and EMA as the host path does
    reference_params, _ = _params_and_loss()
    ref_opt = optimizer_by_name(name, reference_params, 1e-2, 0.01)
    for _ in range(2):
        ref_opt.zero_grad()
        sum((p * p).sum() for p in reference_params).backward()
        torch.nn.utils.clip_grads_with_norm_(reference_params, 1.0,
                                             torch.nn.utils.get_total_norm([p.grad for p in reference_params]))
        ref_opt.step()
    for p, r in zip(params, reference_params):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=0)


def _train_step(transformer, network, noise, settings=StepSettings(use_load_balancing_loss=True)):
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = optimizer_by_name("adamw", params, 1e-3, 0.01)
    lb = LoadBalancingLoss(transformer, 0.01)
    return TrainStep(transformer, params, optimizer, lb, settings, noise)


def _tiny_setup(tiny_transformer, speedups=Speedups(), checkpointing=False, prepare=None):
    transformer = copy.deepcopy(tiny_transformer).train()
    if prepare is not None:
        prepare(transformer)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    network = create_lokr_network(transformer, ATTENTION_ONLY)
    _set_factors(network)
    report = apply_speedups(transformer, network, speedups)
    embeds = random_conditioning(transformer, batch=2, seed=3)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    return transformer, network, report, [lambda: MicroBatch(latents, embeds)]


def test_the_train_step_reads_nothing_on_the_host_and_its_result_once(tiny_transformer):
    """After the optimizer's first update, `launch` (forward, loss, backward, clip, update, EMA-free) dispatches no
    device-to-host read; the pending step's `result()` makes exactly one."""
    transformer, network, report, batches = _tiny_setup(tiny_transformer)
    assert report["grouped_moe_layers"] > 0 and report["sorted_moe_layers"] == 0
    noise = FixedNoise()
    step = _train_step(transformer, network, noise)
    first = step.run(batches, 0)
    assert first.updated and first.load_balancing_loss > 0
    noise.step = 1
    with HostSyncCounter() as syncs:
        pending = step.launch(batches, 1)
    assert syncs.total == 0, syncs.by_op
    with HostSyncCounter() as syncs:
        outcome = pending.result()
    assert syncs.total == 1 and outcome.updated and math.isfinite(outcome.grad_norm)
    assert pending.result() is outcome


def test_attached_load_balancing_gradient_equals_the_kept_loss(tiny_transformer):
    """The trainer's step gives the aux loss its gradient inside the MoE's backward; the stock way keeps the loss
    with its graph and adds it. Same loss and LoKr gradients, with and without checkpointing."""
    from test_speedups import _loss_and_grads

    for checkpointing in (False, True):
        transformer, network, _, batches = _tiny_setup(tiny_transformer, Speedups.none(), checkpointing)
        flow0, aux0, grads0 = _loss_and_grads(transformer, network, checkpointing)  # kept (stock)
        transformer, network, _, batches = _tiny_setup(tiny_transformer, Speedups(), checkpointing)
        lb = LoadBalancingLoss(transformer, 0.01)
        lb.attach_gradient(1.0)
        flow1, aux1, grads1 = _loss_and_grads_with(transformer, network, lb)
        assert flow1 == pytest.approx(flow0, rel=1e-5) and aux1 == pytest.approx(aux0, rel=1e-5)
        for name, g0 in grads0.items():
            torch.testing.assert_close(grads1[name], g0, rtol=1e-4, atol=1e-7, msg=name)


def _loss_and_grads_with(transformer, network, lb):
    """test_speedups._loss_and_grads with a given (attached) LoadBalancingLoss: only the flow loss is
    backpropagated, the aux gradient rides in the graph."""
    from trainer_core.hidream import flow_matching_loss, flow_matching_target, noisy_latents, patch_tokens_to_image

    embeds = random_conditioning(transformer, batch=2, seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    lb.clear()
    out = transformer(hidden_states=noisy_latents(x0, noise, sigmas), timesteps=sigmas * 1000,
                      encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                      pooled_embeds=embeds.pooled, return_dict=False)[0]
    flow = flow_matching_loss(-patch_tokens_to_image(out, 8, 8), flow_matching_target(x0, noise))
    aux = lb.take()
    assert not aux.requires_grad
    flow.backward()
    lb.remove()
    grads = {f"{l.lora_name}.{n}": p.grad.clone() for l in network.loras for n, p in l.named_parameters()}
    return flow.item(), aux.item(), grads


class SavedActivations:
    """Bytes of the distinct storages autograd saves for the backward, the model's own weights left out: on a CPU
    the proxy of a GPU step's activation peak."""

    def __init__(self, *modules):
        self.exclude = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
        self.seen: dict = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _attached_loss_and_grads(transformer, network):
    for p in network.parameters():
        p.grad = None
    lb = LoadBalancingLoss(transformer, 0.01)
    lb.attach_gradient(1.0)
    return _loss_and_grads_with(transformer, network, lb)


def test_whole_compiled_blocks_compute_the_eager_step_with_no_graph_break(tiny_transformer, tmp_path):
    """Every block compiled as one graph, MoE included: no graph break, one graph per block kind and input
    signature (the first double block's input needs no gradient: a second signature), none recompiled, the same
    loss and LoKr gradients as eager in float32, with and without checkpointing, and no more saved activations
    than the eager lean backward."""
    from trainer_core.speedups.compile_blocks import compile_stats, reset_compile_state

    reset_compile_state()
    saved, results = {}, {}
    for compiled in (False, True):
        transformer, network, report, _ = _tiny_setup(tiny_transformer, Speedups(compile_blocks=compiled))
        if compiled:
            assert report["whole_blocks"] == report["compiled_blocks"] == 6 and report["regional_blocks"] == 0
            _attached_loss_and_grads(transformer, network)  # compiles
        for checkpointing in (False, True):
            if checkpointing:
                transformer.enable_gradient_checkpointing()
            with SavedActivations(transformer, network) as activations:
                results[compiled, checkpointing] = _attached_loss_and_grads(transformer, network)
            saved[compiled, checkpointing] = activations.bytes
    stats = compile_stats()
    assert stats["graph_breaks"] == 0 and not stats["failed"] and stats["recompiles"] == 0, stats
    assert 0 < stats["graphs"] <= 3, stats  # double (input without / with grad) and single blocks
    flow0, aux0, grads0 = results[False, False]
    for key, (flow, aux, grads) in results.items():
        assert flow == pytest.approx(flow0, rel=1e-5) and aux == pytest.approx(aux0, rel=1e-5), key
        for name, g0 in grads0.items():
            torch.testing.assert_close(grads[name], g0, rtol=1e-4, atol=1e-7, msg=f"{key} {name}")
    assert saved[True, False] <= saved[False, False], saved  # compiled blocks keep no more for the backward
    assert saved[True, True] <= saved[False, True], saved
    reset_compile_state()


def test_compiled_blocks_on_an_int8_base(tiny_transformer):
    """int8 (quanto) experts keep the sorted MoE dispatch: blocks compile around it (reported as regional), the
    attention's quantised Linears and LoKr compile; the step equals the eager one."""
    from trainer_core.quant import quantize_frozen
    from trainer_core.speedups.compile_blocks import compile_stats, reset_compile_state

    reset_compile_state()

    def int8(transformer):
        quantize_frozen(transformer, "int8-quanto")
        transformer.requires_grad_(False)

    results = []
    for compiled in (False, True):
        transformer, network, report, _ = _tiny_setup(tiny_transformer, Speedups(compile_blocks=compiled),
                                                      checkpointing=True, prepare=int8)
        assert report["lean_int8_layers"] > 0 and report["grouped_moe_layers"] == 0
        if compiled:
            assert report["regional_blocks"] == 6
        results.append(_attached_loss_and_grads(transformer, network))
    assert not compile_stats()["failed"]
    (flow0, aux0, grads0), (flow, aux, grads) = results
    assert flow == pytest.approx(flow0, rel=1e-5) and aux == pytest.approx(aux0, rel=1e-5)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads[name], g0, rtol=1e-4, atol=1e-7, msg=name)
    reset_compile_state()


class ReplayByRerun:
    """A CPU stand-in for torch.cuda.graph: capture runs the body once with the step's state put back afterwards
    (a real capture records without executing), replay runs it again and writes into the captured outputs. It
    checks that the captured step depends only on its static buffers and persistent state (noise, inputs)."""

    def __init__(self, state):
        self.state = state  # the tensors a step updates, to put back after the capture's run

    def capture(self, body, static, device):
        saved = [t.detach().clone() for t in self.state()]
        outputs = body(static)
        with torch.no_grad():
            for t, s in zip(self.state(), saved):
                t.copy_(s)

        def replay():
            fresh = body(static)
            with torch.no_grad():
                outputs.copy_(fresh)
        return replay, outputs

    def reserved(self, device):
        return 0

    def release(self, device):
        pass


def test_graphed_step_replays_the_plain_step(tiny_transformer):
    """The CUDA-graph path's plumbing on the CPU: noise drawn outside into static buffers, warm-up, one capture,
    replays, the learning rate as a tensor the schedule fills (logged as a host number), a NaN step skipped: the
    same losses, weights and optimizer state as the plain step, step for step."""
    from diffusers.optimization import get_scheduler

    from trainer_core.config.schema import NoiseSchedule
    from trainer_core.training.graphed_step import GraphedTrainStep
    from trainer_core.training.step import NoiseSampler
    from trainer_core.util.cuda_graphs import SignatureGraphs

    runs = []
    for graphed in (False, True):
        transformer, network, _, batches = _tiny_setup(tiny_transformer)
        params = [p for p in network.parameters() if p.requires_grad]
        optimizer = optimizer_by_name("adamw", params, 1e-3, 0.01)
        schedule = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
        noise = NoiseSampler(torch.Generator().manual_seed(7), NoiseSchedule())
        step = TrainStep(transformer, params, optimizer, LoadBalancingLoss(transformer, 0.01),
                         StepSettings(use_load_balancing_loss=True), noise, lr_schedule=schedule)
        if graphed:
            def state(step=step, params=params):
                return [*params, *(v for p in params for v in step.optimizer.state[p].values())]
            graphs = SignatureGraphs("training step", warmup=2, backend=ReplayByRerun(state))
            step = GraphedTrainStep(step, transformer, graphs=graphs, force=True)
        poisoned = {5}
        outcomes, lrs = [], []
        for i in range(7):
            if i in poisoned:  # a NaN latent: the step must leave everything as it was
                latents = batches[0]().latents
                bad = [lambda: MicroBatch(latents * float("nan"), batches[0]().embeds)]
                outcomes.append(step.launch(bad, i).result())
            else:
                outcomes.append(step.launch(batches, i).result())
            lrs.append(schedule.get_last_lr()[0])
        runs.append((outcomes, [p.detach().clone() for p in params], lrs,
                     {k: v.clone() for p in params for k, v in optimizer.state[p].items()}))
        if graphed:
            assert graphs.captures == 1 and graphs.replays == 4, (graphs.captures, graphs.replays)  # steps 3-6
            assert all(isinstance(lr, float) for lr in lrs)
    (plain, w0, lr0, s0), (graphed, w1, lr1, s1) = runs
    assert [o.updated for o in plain] == [o.updated for o in graphed] == [True] * 5 + [False, True]
    for a, b in zip(plain, graphed):
        assert a.loss == pytest.approx(b.loss, rel=1e-6) or (math.isnan(a.loss) and math.isnan(b.loss))
    assert lr0 == pytest.approx(lr1)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_deferred_step_reads_train_exactly_as_immediate_ones(tiny_paths, tiny_model_dir, tmp_path, monkeypatch):
    """The loop reading step N's numbers after step N+1 is queued (the GPU default) trains what reading them at
    once does: same losses, same LoKr file, a NaN step still skipped, checkpoints at their steps."""
    from safetensors.torch import load_file

    from helpers import tiny_train_config, write_shapes_dataset
    from test_faults import components_with, poison_forward_calls
    from trainer_core.training import train

    shapes = write_shapes_dataset(tmp_path / "shapes", [("circle", "red", "blue"), ("square", "green", "yellow")])
    results = {}
    for defer in ("0", "1"):
        monkeypatch.setenv("HIDREAM_DEFER_STEP_READS", defer)
        out = tmp_path / f"defer{defer}"
        results[defer] = train(tiny_train_config(tiny_model_dir, shapes, out, max_train_steps=5,
                                                 checkpoint_step_interval=2),
                               components=components_with(tiny_paths, poison_forward_calls({3})))
        assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    now, later = results["0"], results["1"]
    assert now.nonfinite_steps == later.nonfinite_steps == 1
    assert now.losses[:2] == later.losses[:2] and math.isnan(later.losses[2]) and now.losses[3:] == later.losses[3:]
    a, b = load_file(str(now.lokr_path)), load_file(str(later.lokr_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deferred_reads_still_stop_on_a_command(tiny_model_dir, tmp_path, monkeypatch):
    """A "stop" sent on seeing step 3 stops the run at the next step that can stop (the reads are one step
    behind, so step 4 is already queued): a checkpoint of that step, resumable."""
    from helpers import tiny_train_config, write_shapes_dataset
    from trainer_core.training import TrainingCallbacks, train

    monkeypatch.setenv("HIDREAM_DEFER_STEP_READS", "1")
    shapes = write_shapes_dataset(tmp_path / "shapes", [("circle", "red", "blue"), ("square", "green", "yellow")])
    seen = {"step": 0}
    callbacks = TrainingCallbacks(on_step=lambda m: seen.update(step=m.step),
                                  poll_commands=lambda: ["stop"] if seen["step"] == 3 else [])
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=8),
                   callbacks=callbacks)
    assert result.stopped and result.steps_done == 4 and len(result.losses) == 4
    assert result.checkpoint_path == tmp_path / "out" / "checkpoint-4"


def test_sampling_forward_reads_nothing_on_the_host_and_equals_the_eval_output(tiny_transformer):
    """predict_flow in eval mode (the sampler's CFG batch of 2), grouped MoE: no host read (diffusers' eval crop
    read the sizes back per sample), the same prediction as diffusers' own eval output; GraphedPredict on a CPU
    is the plain call."""
    from trainer_core.hidream import predict_flow
    from trainer_core.hidream.forward import GraphedPredict
    from trainer_core.hidream.flow_matching import patch_tokens_to_image

    transformer, network, _, _ = _tiny_setup(tiny_transformer)
    transformer.eval()
    embeds = random_conditioning(transformer, batch=2, seed=5)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        with HostSyncCounter() as syncs:
            ours = predict_flow(transformer, x, t, embeds)
        assert syncs.total == 0, syncs.by_op
        assert not transformer.training
        stock = -transformer(hidden_states=x, timesteps=t, encoder_hidden_states_t5=embeds.t5,
                             encoder_hidden_states_llama3=embeds.llama, pooled_embeds=embeds.pooled,
                             return_dict=False)[0]
        torch.testing.assert_close(ours, patch_tokens_to_image(stock, 8, 8), rtol=0, atol=0)
        graphed = GraphedPredict(transformer)
        assert not graphed.graphs.enabled
        torch.testing.assert_close(graphed(x, t, embeds), ours, rtol=0, atol=0)


def test_the_run_logs_what_compile_and_graphs_cost_and_save(caplog):
    """The payback line: compile cost, per-step saving and steps to pay back from the first steps' times, and a
    plain "switch it off" when there is no saving."""
    import logging

    from trainer_core.training.payback import SpeedupPayback

    class Done:
        def result(self):
            return None

    class StepClock:
        """Each step "finishes" exactly `seconds` after it started: the figures do not depend on this machine."""
        now = 0.0

        def __call__(self):
            return self.now

        def run(self, payback, step, seconds):
            started = self.now
            self.now += seconds
            payback.record(step, started, Done())

    clock = StepClock()
    payback = SpeedupPayback(True, True, torch.device("cpu"), first_step=1, total_steps=100, clock=clock)
    assert [payback.measuring(s) for s in (1, 6, 7)] == [True, True, False]
    steps = {1: 5.0, 2: 1.0, 3: 31.0, 4: 0.5, 5: 2.75, 6: 0.25}  # eager, eager, compiling, compiled, capture, replay
    with caplog.at_level(logging.INFO, logger="trainer_core.training.payback"):
        for step, seconds in steps.items():
            clock.run(payback, step, seconds)
    line = caplog.records[-1].getMessage()
    assert "compile_blocks: compile 30.5 s, per-step saving 0.500 s" in line and "paid back after 61 steps" in line
    assert "cuda_graphs: capture 2.5 s, per-step saving 0.250 s" in line and "paid back after 10 steps" in line
    assert "94 steps left" in line
    slow = SpeedupPayback(True, False, torch.device("cpu"), first_step=1, total_steps=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="trainer_core.training.payback"):
        for step, seconds in {1: 1.0, 2: 1.0, 3: 9.0, 4: 2.0}.items():
            clock.run(slow, step, seconds)
    assert "no saving here, switch it off (compile_blocks: false)" in caplog.records[-1].getMessage()


def test_a_run_with_compile_and_graphs_switched_on_says_what_they_did(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """compile_blocks + cuda_graphs in a real (tiny, CPU) run: blocks compiled (aot_eager keeps it cheap), the
    compile cache in the run's cache folder, CUDA graphs refused with the reason, the payback line logged, and the
    losses those of the same run without them."""
    import logging

    from helpers import tiny_train_config, write_shapes_dataset
    from trainer_core.speedups.compile_blocks import reset_compile_state
    from trainer_core.training import train

    monkeypatch.setenv("HIDREAM_COMPILE_BACKEND", "aot_eager")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    reset_compile_state()
    shapes = write_shapes_dataset(tmp_path / "shapes", [("circle", "red", "blue"), ("square", "green", "yellow")])
    runs = {}
    with caplog.at_level(logging.INFO):
        for on in (False, True):
            runs[on] = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / f"out{on}", max_train_steps=5,
                                               compile_blocks=on, cuda_graphs=on))
    log = caplog.text
    assert "runs without CUDA graphs: CUDA graphs need a CUDA device" in log
    assert "speed-up payback (first steps of the run): compile_blocks: compile" in log
    payback = next(line for line in log.splitlines() if "speed-up payback" in line)
    assert "cuda_graphs" not in payback  # refused here: nothing to measure
    assert "recompiled on inputs it had seen" not in log  # the eager payback steps compile nothing
    assert (tmp_path / "outTrue" / "cache" / "torch-compile").is_dir()
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-4)
    reset_compile_state()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_bench.sh runs it)")


@cuda
def test_cuda_graphed_training_step_on_the_gpu(tiny_transformer):
    """On a GPU: the tiny transformer in bf16 (the grouped GEMM's CUDA dtype), the step captured once and replayed;
    losses follow the plain step's, with and without compiled blocks."""
    from trainer_core.training.graphed_step import GraphedTrainStep

    device = torch.device("cuda")
    for speedups in (Speedups(), Speedups(compile_blocks=True)):
        runs = []
        for graphed in (False, True):
            base = copy.deepcopy(tiny_transformer).to(device, torch.bfloat16)
            transformer, network, report, _ = _tiny_setup(base, speedups, checkpointing=True)
            assert report["grouped_moe_layers"] > 0, report
            network.to(device)
            embeds = random_conditioning(transformer, batch=2, seed=3).to(device=device, dtype=torch.bfloat16)
            latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4)).to(device)
            batches = [lambda: MicroBatch(latents, embeds)]
            noise = FixedNoise()
            step = _train_step(transformer, network, noise)
            if graphed:
                step = GraphedTrainStep(step, transformer)
                assert step.why_not is None, step.why_not
            losses = []
            for i in range(6):
                noise.step = i
                losses.append(step.launch(batches, i).result().loss)
            if graphed:
                assert step.graphs.captures == 1 and step.graphs.replays == 3, vars(step.graphs)
            runs.append(losses)
        assert runs[1] == pytest.approx(runs[0], rel=2e-2), (speedups, runs)


@cuda
def test_cuda_graphed_sampling_call_on_the_gpu(tiny_transformer):
    from trainer_core.hidream import predict_flow
    from trainer_core.hidream.forward import GraphedPredict

    device = torch.device("cuda")
    base = copy.deepcopy(tiny_transformer).to(device, torch.bfloat16)
    transformer, _, _, _ = _tiny_setup(base)
    transformer.eval()
    embeds = random_conditioning(transformer, batch=2, seed=5).to(device=device, dtype=torch.bfloat16)
    graphed = GraphedPredict(transformer)
    with torch.no_grad():
        for i in range(5):
            x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(i)).to(device)
            t = torch.full((2,), 100.0 * (i + 1), device=device)
            torch.testing.assert_close(graphed(x, t, embeds), predict_flow(transformer, x, t, embeds),
                                       rtol=2e-2, atol=2e-2)
    assert graphed.graphs.captures == 1 and graphed.graphs.replays == 3


@pytest.mark.parametrize("shape", [(8, 8), (8, 12)])
@pytest.mark.parametrize("training", [True, False])
def test_predict_flow_with_cached_bucket_inputs_equals_diffusers_own_patchify(tiny_transformer, shape, training):
    """predict_flow hands diffusers pre-patchified tokens with per-bucket ids, sizes and masks made once (diffusers
    makes img_sizes with a host-to-device copy at every call, which no CUDA graph can hold): bit for bit diffusers'
    own call, square and padded non-square, train and eval (the stock MoE here: its own host reads are the
    grouped dispatch's business)."""
    from trainer_core.hidream import predict_flow

    transformer = tiny_transformer.train(training)
    h, w = shape
    embeds = random_conditioning(transformer, batch=2, seed=5)
    x = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = predict_flow(transformer, x, t, embeds)
        again = predict_flow(transformer, x, t, embeds)  # the bucket's cached inputs
        out = transformer(hidden_states=x, timesteps=t, encoder_hidden_states_t5=embeds.t5,
                          encoder_hidden_states_llama3=embeds.llama, pooled_embeds=embeds.pooled,
                          return_dict=False)[0]
    from trainer_core.hidream.flow_matching import patch_tokens_to_image

    torch.testing.assert_close(ours, -patch_tokens_to_image(out, h, w), rtol=0, atol=0)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    assert len(transformer.__dict__["_hidream_bucket_inputs"]) == 1
