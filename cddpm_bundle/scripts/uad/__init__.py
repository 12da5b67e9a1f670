"""Shared code of both bundles: data layer, post-processing, threshold calibration and UAD metrics.

This folder is the one source of truth; each bundle carries an exact copy in ``<bundle>/scripts/uad`` (written by
``scripts/sync_shared.py``, checked by the test suite) so that a bundle folder works on its own.
"""
