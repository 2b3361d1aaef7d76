"""Importable `datasets` builders for the CTAL benchmarks (`datasets` 4+ no longer runs loading scripts):

- `dataset_scripts.nyuv2.NYUv2`: NYUv2, MTAN `.npy` layout (semseg, depth, normals);
- `dataset_scripts.cityscapes.Cityscapes`: Cityscapes 128x256, MTAN layout, configs `19class` / `7class`;
- `dataset_scripts.pascal_context.PascalContext`: PASCAL-Context, PASCAL-MT layout (5 tasks);
- `dataset_scripts.synthetic.SyntheticScenes`: offline procedurally rendered scenes, configs `nyuv2` / `pascal`;
- `python -m dataset_scripts.publish NAME ...`: Parquet + dataset card, to the Hub or a folder.

Usage: `builder = NYUv2(data_dir=..., cache_dir=...); builder.download_and_prepare(); ds = builder.as_dataset()`."""

__all__ = ["cityscapes", "nyuv2", "pascal_context", "publish", "synthetic"]
