"""detforge: from Ground Truth labels to an object detector on the edge."""

__version__ = "0.1.0"
