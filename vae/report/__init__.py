"""The tables of README.md and docs/, one module per study of conf/experiment/ (vae/results.py fills them)."""
