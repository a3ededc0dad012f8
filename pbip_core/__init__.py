"""pbip_core: the library behind the PBIP reproducibility book.

One module per idea of the paper (Tang et al., CVPR 2025): ``bank`` (sec. 3.2), ``model`` (sec. 3.3-3.4),
``losses`` (sec. 3.5), ``train``, ``pseudo``, ``stage2``, ``metrics`` (sec. 4.1), ``data`` and ``encoders``.
"""

__version__ = "0.1.0"
