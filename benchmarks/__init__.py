"""Side-by-side benchmarks of sqr_fx against its peers: ``python -m benchmarks.run``."""
