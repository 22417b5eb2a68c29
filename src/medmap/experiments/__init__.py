"""Experiments that test the techniques themselves on a user's own model.

* :mod:`medmap.experiments.calibrate`: planted-fact calibration (does a technique find the block
  a fictional fact was written into?), ``medmap calibrate``;
* :mod:`medmap.experiments.edit_test`: map-guided unlearning (do the blocks a map ranks highest
  make better edit targets than random or the lowest-ranked blocks?), ``medmap edit-test``.

Edits live in memory only: every edited parameter is restored before a function returns.
"""
