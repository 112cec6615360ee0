"""Small command-line tools beside the entry points."""
