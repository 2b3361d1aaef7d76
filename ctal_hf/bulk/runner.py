"""The bulk loop: skip what is done, shard the rest over the processes (`PartialState.split_between_processes`),
predict in batches with a progress bar on the main process, write each input's outputs, and gather one summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import PIL.Image

from .sources import BulkItem
from .writers import remove_temporaries

logger = logging.getLogger(__name__)

# What a bad input raises while it is opened or predicted (other errors stop the run).
INPUT_ERRORS = (ValueError, OSError, SyntaxError, PIL.Image.DecompressionBombError)


@dataclass
class BulkSummary:
    """What a run did, over all processes: inputs `written`, `skipped` (done by an earlier run), `failed` (source ->
    reason), and the throughput of the prediction loop (model loading excluded)."""

    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    processes: int = 1
    seconds: float = 0.0
    removed_temporaries: int = 0

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second}

    def describe(self) -> str:
        lines = [
            f"{self.total} input(s): {self.written} written, {self.skipped} skipped (already done), "
            f"{len(self.failed)} failed; {self.processes} process(es), {self.images_per_second:.2f} images/s"
        ]
        lines += [f"  failed: {source}: {reason}" for source, reason in sorted(self.failed.items())]
        return "\n".join(lines)


def _batches(items: Sequence[BulkItem], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_bulk(
    predictor,
    source,
    writer,
    state,
    batch_size: int = 1,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> BulkSummary:
    """Predicts every input of `source` that `writer` does not have yet, this process's share of them; returns the
    summary gathered from every process (the same on each). `options` go to the pipeline call (`resolution`,
    `overlap`)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    items = source.items
    removed = remove_temporaries(writer.root) if state.is_main_process else 0
    done = writer.finished(items)  # every process checks before any writes (the barrier below)
    state.wait_for_everyone()
    pending = [item for item in items if item.key not in done]
    written, failed = 0, {}
    start = time.perf_counter()
    with state.split_between_processes(pending) as mine:
        bar = tqdm(
            total=len(mine), desc="ctal-predict-bulk", unit="img", disable=not (progress and state.is_main_process)
        )
        for batch in _batches(mine, batch_size):
            loaded = []
            for item in batch:
                try:
                    loaded.append((item, source.load(item)))
                except INPUT_ERRORS as error:
                    failed[item.source] = str(error)
            results = _predict_batch(predictor, loaded, tasks, writer.needs_visualizations, failed, options or {})
            for item, result in results:
                writer.write(item, result)
                written += 1
            bar.update(len(batch))
        bar.close()
        writer.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    parts = gather_object([{"written": written, "failed": failed, "seconds": seconds, "removed": removed}])
    summary = BulkSummary(total=len(items), skipped=len(done), processes=state.num_processes)
    for part in parts:
        summary.written += part["written"]
        summary.failed.update(part["failed"])
        summary.seconds = max(summary.seconds, part["seconds"])
        summary.removed_temporaries += part["removed"]
    return summary


def _predict_batch(predictor, loaded, tasks, visualize: bool, failed: dict, options) -> list[tuple[BulkItem, dict]]:
    """Predicts a batch; when it fails on a bad input, predicts its images one by one so only that one fails."""
    if not loaded:
        return []
    images = [image for _, image in loaded]
    try:
        results = predictor(images, tasks=tasks, visualize=visualize, batch_size=len(images), **options)
        return list(zip([item for item, _ in loaded], results, strict=True))
    except INPUT_ERRORS as error:
        if len(loaded) == 1:
            failed[loaded[0][0].source] = str(error)
            return []
    results = []
    for pair in loaded:
        results += _predict_batch(predictor, [pair], tasks, visualize, failed, options)
    return results


__all__ = ["BulkSummary", "INPUT_ERRORS", "run_bulk"]
