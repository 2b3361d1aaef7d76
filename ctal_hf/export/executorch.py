"""ExecuTorch: the `torch.export` program lowered to the XNNPACK delegate (`to_edge_transform_and_lower`), written as
`model.pte`, and a session on ExecuTorch's Python runtime. ExecuTorch is an extra of its own
(`pip install 'ctal-hf[executorch]'`): its wheel declares no torch requirement but is built against one torch
release, and it pins torchao, coremltools and mpmath, which `dev` should not carry (docs/design.md, "Export").

The graph has a fixed batch of 1: ExecuTorch plans its memory for the largest shape a dynamic dimension allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import CTALExportOptions


def export_executorch(program, folder: Path, options: CTALExportOptions) -> dict:
    import executorch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    (Path(folder) / "model.pte").write_bytes(lowered.buffer)
    version = getattr(executorch, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version

        version = package_version("executorch")
    return {"delegate": "XNNPACK", "executorch_version": version}


class CTALExecuTorchSession:
    """ExecuTorch's Python runtime on `model.pte`: `session(pixel_values) -> {output name: array}`."""

    def __init__(self, model_file, output_names, num_threads: int | None = None):
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(str(model_file))
        self.method = self.program.load_method("forward")
        self.output_names = list(output_names)
        from importlib.metadata import version

        self.version = version("executorch")

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        batch = np.ascontiguousarray(pixel_values, np.float32)
        outputs = [self.method.execute([torch.from_numpy(batch[index : index + 1])]) for index in range(len(batch))]
        return {
            name: np.concatenate([np.asarray(out[position]) for out in outputs])
            for position, name in enumerate(self.output_names)
        }


def executorch_session(model_file, output_names, num_threads: int | None = None) -> CTALExecuTorchSession:
    return CTALExecuTorchSession(model_file, output_names, num_threads)


__all__ = ["CTALExecuTorchSession", "executorch_session", "export_executorch"]
