"""Shared code of both bundles: data layer and protocol transforms, the slice inferer base, post-processing, UAD
metrics, threshold calibration, figures, the evaluation workflow, training handlers, export, and atomic files.

This folder is the one source of truth; each bundle carries an exact copy in ``<bundle>/scripts/uad`` (written by
``scripts/sync_shared.py``, checked by the test suite) so that a bundle folder works on its own.
"""
