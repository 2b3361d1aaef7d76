"""Dataset cards (README.md with a YAML header) that `dataset_scripts.publish` uploads with each dataset."""
