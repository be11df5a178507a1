"""Hydra configuration shipped inside the package (found as pkg://lightning_qlora.app.conf)."""
