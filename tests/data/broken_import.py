"""A model file that fails while it is imported."""

raise RuntimeError("this file cannot be imported")
