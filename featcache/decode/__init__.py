"""Decoders shared by both halves (numpy, Pillow, optional pydicom / nibabel; never torch).

``images``: one 2-D image or mask (PNG, JPEG, TIFF 8/16 bit, DICOM) as float32 in [0, 1];
``dicom``: the DICOM path (header-first pixel limit, rescale, window, MONOCHROME1, frames);
``volume``: NIfTI volumes, DICOM series and multi-frame DICOM as one array with its affine.
"""

from featcache.decode.images import check_header, is_dicom, read_image, read_mask
from featcache.decode.volume import Volume, read_label_volume, read_volume, voxel_spacing

__all__ = [
    "Volume",
    "check_header",
    "is_dicom",
    "read_image",
    "read_label_volume",
    "read_mask",
    "read_volume",
    "voxel_spacing",
]
