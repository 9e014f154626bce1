"""Evaluation: VOC07 / all-point AP (``metrics``, streaming and mergeable), COCO AP through pycocotools
(``coco_metrics``), and ``evaluate`` (a run or a deploy folder on a manifest: figures, PR curves)."""
