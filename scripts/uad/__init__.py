"""Shared code of both bundles: data layer, post-processing, threshold calibration and UAD metrics.

This folder is the one source of truth; each bundle reaches it through the symlink ``<bundle>/scripts/uad``
and ``scripts/package_bundle.py`` stores its files in a bundle archive so the bundle works on its own.
"""
