"""Multitask loss balancing: how the per-task losses become the loss that is back-propagated.

Each method is an `nn.Module` in a registry (`LOSS_WEIGHTINGS`), built by `build_loss_weighting`, with the same
interface:

- `forward(task_losses, terms)` -> `{task: weighted term}` (their sum is the training loss; a gradient aggregator
  takes them one per task). `task_losses` are the model's `outputs.task_losses` (the preset's fixed weight times the
  final plus initial loss of each task); methods other than `fixed` replace the fixed weights by their own, so they
  read the unweighted loss `task_losses[task] / loss_weights[task]`. `terms` is the number of loss terms per task
  (2 with initial predictions, 1 without).
- `after_step(...)` once per optimizer step, `end_epoch()` after every epoch (DWA), `current_weights()` for the
  trackers, and `state_dict()` / `load_state_dict()` (registered with `accelerator.register_for_checkpointing`) so a
  resumed run continues exactly. Learned weights that a gradient trains (uncertainty) are `parameters()` that the
  training script puts in its optimizer; the states that change by a rule (DWA's loss history, FAMO's logits and
  their own optimiser) are in the module's state too. Statistics are averaged across processes each step, so every
  process holds the same weights (DDP and FSDP).

Methods:
- `fixed`: the paper's (preset's) weights.
- `uncertainty`: homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018), as in the authors'
  release: a log-variance `s_t` per task (initialised at -0.5), each loss term `L / (2 exp(s_t)) + s_t / 2`.
- `dwa`: Dynamic Weight Average (Liu, Johns and Davison, MTAN, CVPR 2019): `w_t = K softmax(r_t / T)` with
  `r_t = L_t(e-1) / L_t(e-2)` the ratio of the task's mean training losses of the last two epochs, `T = 2`; weights 1
  for the first two epochs.
- `famo`: Fast Adaptive Multitask Optimisation (Liu et al., NeurIPS 2023): task logits `xi`, `z = softmax(xi)`, loss
  `sum_t z_t log(L_t) / c` with `c = sum_t z_t / L_t` (no gradient); after each optimizer step the losses of the same
  batch are computed again and `xi` takes an Adam step (lr 0.025, weight decay 0.01) along
  `J_softmax(xi)^T (log L_before - log L_after)`.
"""

import copy

import torch
from torch import nn

EPS = 1e-8


class CTALLossWeighting(nn.Module):
    """Base class: fixed weights (the preset's)."""

    name = "fixed"
    needs_loss_after_step = False  # FAMO: the losses of the same batch after the optimizer step

    def __init__(self, tasks: list[str], loss_weights: dict[str, float]):
        super().__init__()
        self.tasks = list(tasks)
        self.loss_weights = {task: float(loss_weights.get(task, 1.0)) for task in self.tasks}

    def unweighted(self, task_losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses without the preset's fixed weights (a task of weight 0 stays 0: it is not trained)."""
        return {
            task: loss / self.loss_weights[task] if self.loss_weights[task] > 0 else loss * 0.0
            for task, loss in task_losses.items()
        }

    def forward(self, task_losses: dict[str, torch.Tensor], terms: int = 1) -> dict[str, torch.Tensor]:
        return dict(task_losses)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the training script's optimizer trains (no weight decay)."""
        return list(self.parameters())

    def current_weights(self) -> dict[str, float]:
        return dict(self.loss_weights)

    def after_step(self, reduce=None, loss_after_step=None) -> None:
        """Called once per optimizer step. `reduce(tensor)` averages across processes."""

    def end_epoch(self, reduce=None) -> None:
        """Called after every epoch."""


class UncertaintyWeighting(CTALLossWeighting):
    name = "uncertainty"

    def __init__(self, tasks, loss_weights, initial_log_variance: float = -0.5):
        super().__init__(tasks, loss_weights)
        self.log_variances = nn.Parameter(torch.full((len(self.tasks),), float(initial_log_variance)))

    def forward(self, task_losses, terms=1):
        raw = self.unweighted(task_losses)
        out = {}
        for i, task in enumerate(self.tasks):
            if task in raw:
                s = self.log_variances[i]
                out[task] = raw[task] / (2.0 * torch.exp(s)) + 0.5 * terms * s
        return out

    def current_weights(self):
        weights = (0.5 * torch.exp(-self.log_variances.detach().float())).tolist()
        return dict(zip(self.tasks, weights, strict=True))


class DynamicWeightAverage(CTALLossWeighting):
    name = "dwa"

    def __init__(self, tasks, loss_weights, temperature: float = 2.0):
        super().__init__(tasks, loss_weights)
        self.temperature = float(temperature)
        count = len(self.tasks)
        # Mean training loss per task of the last two epochs (row 0: e-1, row 1: e-2), epochs seen, current sums.
        self.register_buffer("history", torch.zeros(2, count, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(count + 1, dtype=torch.float64))
        self.register_buffer("weights", torch.ones(count, dtype=torch.float64))
        self._last = None

    def forward(self, task_losses, terms=1):
        raw = self.unweighted(task_losses)
        if len(raw) == len(self.tasks):  # the epoch means count batches where every task is labelled
            self._last = torch.stack([raw[t].detach().double() for t in self.tasks])
        weights = self.weights.float()
        return {task: weights[i] * raw[task] for i, task in enumerate(self.tasks) if task in raw}

    def after_step(self, reduce=None, loss_after_step=None):
        if self._last is None:
            return
        last = self._last.to(self.running.device)
        if reduce is not None:
            last = reduce(last)
        self.running[:-1] += last
        self.running[-1] += 1
        self._last = None

    def end_epoch(self, reduce=None):
        if self.running[-1] == 0:
            return
        mean = self.running[:-1] / self.running[-1]
        self.history[1] = self.history[0]
        self.history[0] = mean
        self.epochs_seen += 1
        self.running.zero_()
        if self.epochs_seen >= 2:
            ratios = self.history[0] / self.history[1].clamp(min=EPS)
            self.weights.copy_(len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0))

    def current_weights(self):
        return dict(zip(self.tasks, self.weights.float().tolist(), strict=True))


class FAMOWeighting(CTALLossWeighting):
    name = "famo"
    needs_loss_after_step = True

    def __init__(self, tasks, loss_weights, lr: float = 0.025, weight_decay: float = 0.01):
        super().__init__(tasks, loss_weights)
        self.logits = nn.Parameter(torch.zeros(len(self.tasks)))
        # FAMO's own optimiser for the logits (not the model's: their gradient comes from the rule above).
        self._optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=weight_decay)
        self._before = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, task_losses, terms=1):
        raw = self.unweighted(task_losses)
        present = [t for t in self.tasks if t in raw]
        losses = torch.stack([raw[t] for t in present]).float()
        self._before = losses.detach() if len(present) == len(self.tasks) else None
        z = torch.softmax(self.logits.detach(), dim=0)[[self.tasks.index(t) for t in present]].to(losses.device)
        d = losses.clamp(min=0) + EPS
        c = (z / d).sum().detach()
        weighted = d.log() * z / c
        return {task: weighted[i] for i, task in enumerate(present)}

    def after_step(self, reduce=None, loss_after_step=None):
        if self._before is None or loss_after_step is None:
            return
        raw = self.unweighted(loss_after_step)
        after = torch.stack([raw[t].detach() for t in self.tasks]).float()
        before = self._before.to(after.device)
        if reduce is not None:  # the same logits in every process
            before, after = reduce(before), reduce(after)
        delta = ((before.clamp(min=0) + EPS).log() - (after.clamp(min=0) + EPS).log()).to(self.logits.device)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(self.logits, dim=0), self.logits, grad_outputs=delta)
        self._optimizer.zero_grad()
        self.logits.grad = grad
        self._optimizer.step()
        self.logits.grad = None
        self._before = None

    def current_weights(self):
        return dict(zip(self.tasks, torch.softmax(self.logits.detach(), dim=0).tolist(), strict=True))

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        state["_optimizer"] = copy.deepcopy(self._optimizer.state_dict())  # a snapshot, not the live tensors
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = dict(state_dict)
        optimizer_state = state.pop("_optimizer", None)
        result = super().load_state_dict(state, strict=strict, assign=assign)
        if optimizer_state is not None:
            self._optimizer.load_state_dict(optimizer_state)
        return result


LOSS_WEIGHTINGS: dict[str, type[CTALLossWeighting]] = {
    cls.name: cls for cls in (CTALLossWeighting, UncertaintyWeighting, DynamicWeightAverage, FAMOWeighting)
}


def build_loss_weighting(name: str, config) -> CTALLossWeighting:
    """The loss weighting `name` for the tasks and preset weights of `config`."""
    if name not in LOSS_WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {name!r}; choose from {sorted(LOSS_WEIGHTINGS)}.")
    return LOSS_WEIGHTINGS[name](list(config.tasks), dict(config.loss_weights))


__all__ = [
    "CTALLossWeighting",
    "UncertaintyWeighting",
    "DynamicWeightAverage",
    "FAMOWeighting",
    "LOSS_WEIGHTINGS",
    "build_loss_weighting",
]
