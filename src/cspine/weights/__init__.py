"""Trained weights that ship with cspine (package data): ``segmenter/`` is the vertebra segmenter that
``cspine segment``, ``predict`` and the demo use when no model is given, rebuilt by ``cspine build-segmenter``
(:mod:`cspine.seg.shipped`; its ``recipe.json`` holds the recipe, seeds, times and held-out figures)."""
