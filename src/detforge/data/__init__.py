"""The data stage: labels in (Ground Truth manifests and other formats), checked, joined, split, converted."""
