"""seg: distributed training and cohort-scale batch inference for binary image segmentation."""

__version__ = "0.1.0"
