"""Reading and writing volumes with their geometry; atomic file writes."""

from medseg.io.readers import VolumeReadError, load_volume, make_load_transform

__all__ = ["VolumeReadError", "load_volume", "make_load_transform"]
