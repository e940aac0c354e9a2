"""Segmentation probes on patch tokens (torch, imported when a head trains).

``run`` (``run_seg``: what ``probes seg`` does), ``data`` (rows, masks, training targets,
spacings), ``frame`` (the model frame vs the mask's own frame, pixel spacing), ``heads``
(``SegProbe``: linear and light decoders), ``unet`` (the multi-layer decoder), ``metrics`` (Dice,
IoU, HD95 in the mask's pixels), ``volume`` (3-D scoring of slice predictions), ``study`` (the
published protocol's settings).
"""
