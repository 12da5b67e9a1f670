"""The MNI152 templates the repository scripts build data from (demo cohort, IXI benchmark, registration target)."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["MNI152_FILES", "mni152_path"]

MNI152_FILES = {  # the MNI152 2009a symmetric templates (1 mm) shipped inside the nilearn wheel
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",  # skull-stripped T1
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def mni152_path(kind: str = "t1") -> str:
    """Path of an MNI152 template file (``MNI152_FILES``) in the installed nilearn package; nothing is downloaded.

    Found without importing nilearn (its import takes seconds).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nilearn is not installed: it ships the MNI152 templates (see requirements.txt)")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", MNI152_FILES[kind])
