"""Segmentation of liver, pancreas and tumour on portal-venous CT.

Plain modules (no MONAI Deploy import): ``data`` loads a cohort's venous CT
series and ground truth and resamples them to the working grid, ``network``
defines the MONAI SegResNet, ``train`` trains and evaluates it, ``package``
saves and loads model packages in the MONAI bundle layout, ``infer`` segments a
HU volume on its own grid, and ``cli`` is ``oncopacs train seg``.
"""

CLASSES: tuple[str, ...] = ("background", "liver", "pancreas", "tumour")
"""Output classes of every oncopacs segmentation, in label-value order."""
