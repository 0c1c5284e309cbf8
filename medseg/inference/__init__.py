"""Whole-volume prediction with MONAI's sliding-window inferer."""
