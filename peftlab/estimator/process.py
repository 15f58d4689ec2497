"""The expected process peak: what a training process holds beyond the estimate's live tensors, per device.

:func:`peftlab.estimate` counts live tensor bytes (its ``total_peak``: weights + optimizer states + gradients +
activations + loss at the step's worst moment). A process holds more, and how much is a property of the device
and its allocator, measured rather than derived::

    expected process peak = runtime + weights + slack × training_peak

* ``runtime``: the interpreter, torch, transformers and the model classes' code, resident before training
  (on a CPU: RSS after loading minus the weights);
* ``slack``: how much the step's resident memory grows per byte of live tensors it adds. On a CPU with
  glibc's default ``malloc`` freed blocks stay cached for reuse (fragmentation), so RSS grows by more than
  the live bytes; with ``MALLOC_MMAP_THRESHOLD_=65536`` it follows them (slack ≈ 1, see
  ``benchmarks/results/estimator/``).

Measured: :data:`PROCESS` (``benchmarks/process_peak.py``, result in
``benchmarks/results/process_peak/process_peak.json``). CUDA is not measured yet (there the runtime is the
CUDA context, several hundred MiB outside ``torch.cuda.max_memory_allocated``, and the slack is the caching
allocator's reserved-but-unallocated bytes): its expected process peak is ``None``, stated as unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class ProcessOverhead:
    """A device's measured runtime (bytes) and allocator slack (× the estimate's training peak)."""

    runtime: int
    slack: float
    slack_range: tuple[float, float]
    allocator: str
    source: str

    def describe(self) -> str:
        return (
            f"runtime {self.runtime / MIB:,.0f} MiB + weights + {self.slack:.2f}× training tensors "
            f"({self.allocator}; slack measured {self.slack_range[0]:.2f}–{self.slack_range[1]:.2f}, {self.source})"
        )


PROCESS: dict[str, ProcessOverhead] = {
    "cpu": ProcessOverhead(
        runtime=415 * MIB,
        slack=1.38,
        slack_range=(1.13, 1.63),
        allocator="glibc malloc, default thresholds",
        source="benchmarks/results/process_peak",
    ),
}


def expected_process_peak(device: str, weights: int, training_peak: int) -> int | None:
    """Bytes a training process is expected to reach on ``device`` (None where unmeasured, e.g. CUDA)."""
    overhead = PROCESS.get(device)
    if overhead is None:
        return None
    return int(overhead.runtime + weights + overhead.slack * training_peak)


def describe(device: str) -> str:
    """How the expected process peak of ``device`` is formed, in one line."""
    overhead = PROCESS.get(device)
    if overhead is None:
        return f"not measured for {device} yet (runtime and allocator slack; see peftlab.estimator.process)"
    return overhead.describe()


__all__ = ["PROCESS", "ProcessOverhead", "expected_process_peak", "describe"]
