"""The Hydra app ``lightning-qlora`` (the ``[app]`` extra): CLI, configs, the default job's module and data,
tracking.
"""
