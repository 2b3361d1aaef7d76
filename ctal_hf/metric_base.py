"""The streaming metric base class (docs/design.md, "Tasks, losses and metrics"): exact over a whole set and
mergeable across processes.

Every metric keeps its state as tensors of sums and counts (a confusion matrix, per-threshold counts, a histogram of
angles), never per-batch means: states of several batches or processes add up to the state of the whole set, so
`merge` / `all_reduce` give the same numbers as one pass over all the data.

Fractions (mIoU, pixel accuracy, maxF, odsF, fractions of angles within a threshold) are in [0, 1]; the paper prints
them multiplied by 100."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

Reducer = Callable[[torch.Tensor], torch.Tensor]


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a tensor or an array, got {type(value).__name__}.") from error


def _single_channel(value: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) -> (B, H, W)."""
    if value.dim() == 4 and value.shape[1] == 1:
        return value[:, 0]
    if value.dim() == 3:
        return value
    raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {tuple(value.shape)}.")


def _check_same_shape(pred: torch.Tensor, target: torch.Tensor, task: str):
    if pred.shape != target.shape:
        raise ValueError(
            f"{task}: prediction shape {tuple(pred.shape)} does not match the label shape {tuple(target.shape)}; "
            "resize the prediction to the label size before evaluation."
        )


def _warn_empty(task: str):
    logger.warning("%s: no labelled pixel was seen since the last reset; its metrics are NaN.", task)


def threshold_grid(thresholds: int | Sequence[float]) -> torch.Tensor:
    """Thresholds of a probability map: `n` gives the BSDS grid `k / (n + 1)` for k = 1..n (99 gives 0.01..0.99);
    a sequence is used as given (sorted). A pixel is positive at threshold `t` when its probability is >= `t`."""
    if isinstance(thresholds, int):
        if thresholds < 1:
            raise ValueError(f"The number of thresholds must be positive, got {thresholds}.")
        grid = torch.arange(1, thresholds + 1, dtype=torch.float64) / (thresholds + 1)
    else:
        grid = torch.as_tensor(list(thresholds), dtype=torch.float64)
        if grid.dim() != 1 or grid.numel() == 0:
            raise ValueError(f"`thresholds` must be a non-empty 1-D sequence, got {thresholds!r}.")
        grid = grid.sort().values
    return grid


class CTALMetric(ABC):
    """Base class of the streaming metrics: the state is a dict of tensors that add up over batches and processes.

    Subclasses define `_initial_state`, `update` and `compute`; `_signature` lists the settings two metrics must
    share to be merged."""

    task: str = ""
    headline_metric: str = ""

    def __init__(self):
        self._state: dict[str, torch.Tensor] = {}
        self.reset()

    @abstractmethod
    def _initial_state(self) -> dict[str, torch.Tensor]:
        """The empty state: named tensors of sums and counts."""

    def _signature(self) -> tuple:
        return ()

    @property
    def device(self) -> torch.device:
        return next(iter(self._state.values())).device

    def reset(self) -> "CTALMetric":
        """Empties the state (keeps its device)."""
        device = self.device if self._state else torch.device("cpu")
        self._state = {name: value.to(device) for name, value in self._initial_state().items()}
        return self

    def to(self, device: str | torch.device) -> "CTALMetric":
        """Moves the state; `update` also moves it to the device of its inputs."""
        self._state = {name: value.to(device) for name, value in self._state.items()}
        return self

    def _follow(self, device: torch.device):
        if self.device != device:
            self.to(device)

    @abstractmethod
    def update(self, pred: Any, target: Any) -> None:
        """Adds a batch of predictions and labels to the state."""

    def update_examples(self, predictions: Iterable[Any], references: Iterable[Any]) -> None:
        """Updates with one example at a time (no batch dimension): the form `evaluate` modules receive."""
        for pred, ref in zip(predictions, references, strict=True):
            self.update(_as_tensor(pred, f"{self.task} prediction")[None], _as_tensor(ref, f"{self.task} label")[None])

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values of everything added so far."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state: every tensor is a sum over samples, so summing it across processes gives the global state."""
        return dict(self._state)

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> "CTALMetric":
        """Replaces the state, e.g. with the output of `accelerator.reduce(tensor, "sum")` on each tensor."""
        if set(state) != set(self._state):
            raise ValueError(f"{self.task}: state keys {sorted(state)} do not match {sorted(self._state)}.")
        new_state = {}
        for name, value in state.items():
            current = self._state[name]
            value = _as_tensor(value, f"{self.task} state {name!r}")
            if value.shape != current.shape:
                raise ValueError(
                    f"{self.task}: state {name!r} has shape {tuple(value.shape)}, expected {tuple(current.shape)}."
                )
            new_state[name] = value.to(device=current.device, dtype=current.dtype)
        self._state = new_state
        return self

    def merge(self, other: "CTALMetric") -> "CTALMetric":
        """Adds the state of `other` (the same metric with the same settings, e.g. from another shard)."""
        if type(other) is not type(self) or other._signature() != self._signature():
            raise ValueError(
                f"Cannot merge {type(other).__name__}{other._signature()} into {type(self).__name__}"
                f"{self._signature()}: metrics and their settings must match."
            )
        for name, value in other._state.items():
            self._state[name] = self._state[name] + value.to(self.device)
        return self

    def all_reduce(self, reducer: Reducer | None = None) -> "CTALMetric":
        """Sums the state over processes, once, before `compute`.

        With `reducer` (e.g. `lambda t: accelerator.reduce(t, "sum")`) each state tensor is replaced by its result;
        without it, `torch.distributed.all_reduce` sums in place when a process group is initialised, and nothing
        happens otherwise (one process)."""
        if reducer is not None:
            self._state = {name: reducer(value).to(value.device) for name, value in self._state.items()}
            return self
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        backend = torch.distributed.get_backend()
        for name, value in self._state.items():
            work = value
            if backend == "nccl" and value.device.type != "cuda":
                work = value.to(torch.device("cuda", torch.cuda.current_device()))
            work = work.clone()
            torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
            self._state[name] = work.to(value.device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._signature()}"


__all__ = ["CTALMetric", "Reducer", "threshold_grid"]
