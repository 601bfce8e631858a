"""Hydra configs of scm-mm, shipped as a package so that the apps find them from any directory."""
