"""Label formats other than Ground Truth's manifest: ``coco``, ``voc``, ``yolo``, each a reader
(``read_*`` -> class names and a stream of Records) and a writer (``write_*``)."""
