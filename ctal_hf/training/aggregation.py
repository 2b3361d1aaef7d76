"""Gradient aggregation of the per-task losses on the shared backbone through TorchJD (`pip install torchjd`).

`torchjd.autojac.mtl_backward` back-propagates each task's loss: the task-specific parameters receive the usual
gradient, the backbone's parameters (the shared feature extractor) the Jacobian, one row per task; an aggregator
(`jac_to_grad`) then turns the Jacobian into the gradient. Decoder parameters used by several tasks (fusion, CTAL's
cross-task module) receive the sum of the tasks' gradients, as with plain back-propagation; the aggregation applies
to the backbone, whose output is the last representation shared by every task.

Under DDP each process computes its Jacobian on its own batch; they are averaged across processes before the
aggregation (the Jacobian of the mean loss over the global batch, as one process would compute it), and the other
gradients are averaged as DDP would. FSDP shards the parameters, which TorchJD cannot take: refused; so is mixed
precision (TorchJD 0.18's batched Jacobian fails on bf16 features, and fp16's scaler expects
`accelerator.backward`)."""

import importlib.util

import torch

from ..registry import GRADIENT_AGGREGATOR_SPECS

# Command-line name -> (TorchJD aggregator class, keyword arguments, extra its solver needs or None).
AGGREGATORS = GRADIENT_AGGREGATOR_SPECS


def make_aggregator(name: str, num_tasks: int):
    """The TorchJD aggregator named `name`; a clear error when TorchJD or the solver it needs is missing."""
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown gradient aggregator {name!r}; choose from {sorted(AGGREGATORS)}.")
    class_name, kwargs, extra = AGGREGATORS[name]
    if importlib.util.find_spec("torchjd") is None:
        raise ImportError(f"--gradient_aggregator {name} needs TorchJD: pip install torchjd (or ctal-hf[mtl]).")
    if extra is not None and importlib.util.find_spec("cvxpy") is None:
        raise ImportError(
            f"--gradient_aggregator {name} solves a small convex problem with cvxpy: pip install 'torchjd[{extra}]'."
        )
    from torchjd import aggregation

    if class_name == "NashMTL":
        kwargs = {"n_tasks": num_tasks, **kwargs}
    return getattr(aggregation, class_name)(**kwargs)


def check_aggregation_setting(name: str, model, accelerator, mixed_precision: str | None) -> None:
    """Raises before training when the aggregator cannot work with this model or distributed setting."""
    if name == "none":
        return
    if getattr(model, "backbone", None) is None:
        raise ValueError(
            f"--gradient_aggregator {name}: decoder {model.config.decoder!r} has no shared backbone (one per task), so "
            "there is no shared gradient to aggregate. Use a multitask decoder or --gradient_aggregator none."
        )
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            f"--gradient_aggregator {name} does not work with FSDP (the Jacobian needs whole, unsharded parameters): "
            "use DDP (accelerate launch --multi_gpu) or --gradient_aggregator none."
        )
    precision = mixed_precision or accelerator.mixed_precision
    if precision in ("fp16", "bf16"):
        raise ValueError(
            f"--gradient_aggregator {name} does not work with {precision} mixed precision (TorchJD 0.18's batched "
            "Jacobian fails on half-precision features: 'expected scalar type BFloat16 but found Float'; fp16's "
            "gradient scaler also needs accelerator.backward): use --mixed_precision no, or a --loss_weighting "
            "method, which all work with mixed precision."
        )


class SharedFeatures:
    """Records the backbone's output (the last shared representation) at each forward pass."""

    def __init__(self, backbone: torch.nn.Module):
        self.features = None
        self._handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = output

    def tensors(self) -> list[torch.Tensor]:
        value = self.features
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, dict):
            value = list(value.values())
        return [tensor for tensor in value if isinstance(tensor, torch.Tensor) and tensor.requires_grad]

    def remove(self) -> None:
        self._handle.remove()


class GradientAggregation:
    """Back-propagates the per-task losses with `mtl_backward` and aggregates the backbone's Jacobian."""

    def __init__(self, name: str, model: torch.nn.Module, tasks: list[str]):
        from torchjd.autojac import jac_to_grad, mtl_backward

        self.name = name
        self.aggregator = make_aggregator(name, len(tasks))
        self._mtl_backward, self._jac_to_grad = mtl_backward, jac_to_grad
        self.backbone = model.backbone
        self.shared_params = [p for p in self.backbone.parameters() if p.requires_grad]
        shared = {id(p) for p in self.shared_params}
        self.other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in shared]
        self.features = SharedFeatures(self.backbone)

    def backward(self, task_terms: dict[str, torch.Tensor], extra_params=(), reduce_mean=None) -> None:
        """`task_terms`: one scalar loss per task (as the loss weighting gives them). `reduce_mean(tensor)`
        averages a tensor across processes (None: one process). `extra_params` (learned loss weights) are
        averaged too."""
        losses = list(task_terms.values())
        # retain_graph: decoder parts used by several tasks (fusion, CTAL) are back-propagated once per task.
        self._mtl_backward(
            losses, features=self.features.tensors(), shared_params=self.shared_params, retain_graph=True
        )
        if reduce_mean is not None:
            for param in self.shared_params:
                if getattr(param, "jac", None) is not None:
                    param.jac = reduce_mean(param.jac)
            for param in [*self.other_params, *extra_params]:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad = reduce_mean(param.grad)
        self._jac_to_grad(self.shared_params, self.aggregator)
        self.features.features = None


__all__ = ["AGGREGATORS", "make_aggregator", "check_aggregation_setting", "SharedFeatures", "GradientAggregation"]
