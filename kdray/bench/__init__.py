"""Benchmarks (``kdray bench NAME``): each variant in its own process, ratios measured side by
side in one run. :mod:`.losses`, :mod:`.train`, :mod:`.generation` (with :mod:`.signal`),
:mod:`.service`."""
