"""Folder of the `evaluate` module of the same name (a package only so that it ships with `ctal_hf`)."""
