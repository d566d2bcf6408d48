"""Integrations with training frameworks (optional extras; each imports its framework lazily).

- :mod:`fxfusion.integrations.ultralytics`: GABFusion QAT inside Ultralytics' own trainer, and a
  deployed model that Ultralytics validates, predicts with and exports (extra ``[ultralytics]``).
"""
