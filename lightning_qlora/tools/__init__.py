"""Command-line tools: ``lightning-qlora-export`` (merge and export), ``lightning-qlora-report`` (fidelity) and
``lightning-qlora-quantize`` (save a 4-bit base).
"""
