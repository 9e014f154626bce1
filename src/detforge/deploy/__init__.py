"""Deploy: ``export`` (the verified ONNX graph with NMS inside, int8), the torch-free ``runtime``
(``Predictor``), ``predict`` (local) and ``predict_ray`` (a Ray cluster), the reports (``report``: HTML,
``report.pdf``) and ``serve`` (the SageMaker-compatible endpoint)."""
