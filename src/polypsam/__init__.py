"""polypsam: fine-tune Segment Anything for colon-polyp segmentation."""

__version__ = "0.1.0"
