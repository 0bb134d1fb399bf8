"""One inference request after auth, in call order: see pipeline.py."""
