"""The modules the repository's command-line tools (``scripts/*.py``) and tests share; not shipped in the bundles.

``commands`` (the bundle command lines), ``demo_cohort`` (the synthetic demo cohort), ``benchmarking`` (machine
header, timers, reports), ``baselines`` (intensity and mean-healthy-image baselines), ``cpu_backends``,
``datalists`` (seed layout to MONAI datalists) and ``mni152`` (the template shipped with nilearn).
"""
