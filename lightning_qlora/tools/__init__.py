"""Command-line tools: ``lightning-qlora-export`` (merge and export) and ``lightning-qlora-report`` (fidelity)."""
