"""The Hydra apps: scm-mm-train, scm-mm-sample, scm-mm-eval. The only part of scm_mm that imports hydra."""
