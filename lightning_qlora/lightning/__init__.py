"""The Lightning layer (the only package besides ``app`` that imports Lightning): the precision plugin, the three
strategies, checkpoint IO, callbacks and OOM explanations. It decides when and where the recipe runs.
"""
