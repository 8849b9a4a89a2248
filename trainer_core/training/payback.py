"""Whether compile_blocks / cuda_graphs pay for themselves in this run, measured on its first steps and logged.

    compile_blocks:  steps 1-2 run with compiled code forced eager (torch.compiler.set_stance; step 1 warms up,
                     step 2 is the eager time), step 3 compiles, step 4 is the compiled time.
                     compile cost = t3 - t4, per-step saving = t2 - t4, paid back after cost / saving steps.
    cuda_graphs:     the bucket's two warm-up steps run the plain (compiled, if on) step, the next captures, the
                     one after replays: capture cost = t_capture - t_replay, saving = t_plain - t_replay.
                     With compile_blocks too, the graph's warm-up starts after the eager steps (a compile must not
                     happen during a capture), so steps 3-4 are its warm-up and 5-6 capture and replay.

Each of these steps is waited for (synchronize) so its time is its own. The log line says the costs, the savings,
the steps to pay back and the steps the run has left; when a saving is not positive it says so and names the
setting to switch off. Steps of another aspect bucket in between make a figure less clean (it is the step's
time, whatever ran): the log says these are the first steps' figures.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from ..util.device import synchronize

logger = logging.getLogger(__name__)


class SpeedupPayback:
    def __init__(self, compile_blocks: bool, cuda_graphs: bool, device: torch.device, first_step: int,
                 total_steps: int, clock: Callable[[], float] = time.perf_counter):
        """`clock` is the time source a step's `started` came from (the loop's perf_counter; a test's own clock)."""
        self.compile_blocks, self.cuda_graphs = compile_blocks, cuda_graphs
        self.device, self.first, self.total = device, first_step, total_steps
        self.clock = clock
        self.times: dict[int, float] = {}
        self._plan = self._make_plan()
        self._last = max(self._plan.values(), default=-1)

    def _make_plan(self) -> dict:
        """Role -> index (0-based from the run's first step) of the steps measured."""
        plan: dict = {}
        offset = 0
        if self.compile_blocks:
            plan.update(eager=1, compiling=2, compiled=3)
            offset = 2
        if self.cuda_graphs:
            plan.update(plain=offset + 1, capture=offset + 2, replay=offset + 3)
        return plan

    def measuring(self, step: int) -> bool:
        return 0 <= step - self.first <= self._last

    def launcher(self, step: int, step_fn) -> Callable:
        """How to launch `step`: the first two forced eager (the plain step under them, not counted as a graph's
        warm-up) when compile_blocks is on; else the step function itself."""
        if self.compile_blocks and step - self.first < 2:
            plain = getattr(step_fn, "step", step_fn)  # a GraphedTrainStep's TrainStep

            def eager(micro_batches, i):
                with torch.compiler.set_stance("force_eager"):
                    return plain.launch(micro_batches, i)
            return eager
        return step_fn.launch

    def record(self, step: int, started: float, pending) -> None:
        """After launching a measured step: wait for it, keep its time, log when the plan is complete."""
        pending.result()
        synchronize(self.device)
        self.times[step - self.first] = self.clock() - started
        if step - self.first == self._last or step == self.total:  # complete, or the run ends first
            self._log(step)

    def _log(self, step: int) -> None:
        t = {role: self.times.get(i) for role, i in self._plan.items()}
        left = self.total - step
        parts = []
        if self.compile_blocks:
            parts.append(self._line("compile_blocks", "compile", t["compiling"], t["compiled"], t["eager"],
                                    "eager", left))
        if self.cuda_graphs:
            parts.append(self._line("cuda_graphs", "capture", t["capture"], t["replay"], t["plain"],
                                    "without a graph", left))
        logger.info("speed-up payback (first steps of the run): %s", "; ".join(parts))

    @staticmethod
    def _line(name: str, what: str, first: Optional[float], steady: Optional[float], before: Optional[float],
              before_name: str, left: int) -> str:
        if None in (first, steady, before):
            return f"{name}: not measured"
        cost, saving = max(first - steady, 0.0), before - steady
        if saving <= 0:
            return (f"{name}: {what} {cost:.1f} s, steps {steady:.3f} s vs {before:.3f} s {before_name}: no saving "
                    f"here, switch it off ({name}: false)")
        return (f"{name}: {what} {cost:.1f} s, per-step saving {saving:.3f} s ({before:.3f} s {before_name} -> "
                f"{steady:.3f} s), paid back after {cost / saving:.0f} steps, {left} steps left")


def payback_for(config, device: torch.device, first_step: int, total_steps: int,
                step_fn=None) -> Optional[SpeedupPayback]:
    """A SpeedupPayback when compile_blocks or cuda_graphs (and the step can use them) is on, else None."""
    graphs = bool(config.cuda_graphs) and bool(getattr(getattr(step_fn, "graphs", None), "enabled", False))
    if not (config.compile_blocks or graphs):
        return None
    return SpeedupPayback(config.compile_blocks, graphs, device, first_step, total_steps)

