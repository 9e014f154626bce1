"""The browser labeling app: ``jobs`` (the job's items, its Ground Truth output, resume, model proposals)
and ``app`` (the loopback server and the page in ``static/``). No torch."""
