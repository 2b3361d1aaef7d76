"""Bulk prediction (`ctal-predict-bulk`): a folder, a glob or a `datasets` split through `pipeline("dense-multitask")`
on one or many processes (`accelerate launch`, `torchrun`), resumable, one atomic output per input. Not carried in
saved model folders.

- `sources`: what to predict (files or dataset rows), each with the key its outputs are named after.
- `writers`: where the maps go (`.npy` / PNG files per input, or Parquet files that `load_dataset` reads back),
  which inputs are already done, atomic writes.
- `runner`: the loop (sharding over processes, batches, progress bar) and its summary.
- `cli`: the command line, checked before torch or the model is loaded."""
