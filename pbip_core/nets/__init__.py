"""Networks and their weights: frozen encoders phi_e (``encoders``), ClassNet backbones (``backbones``), DeepLab-v2
for stage 2 (``deeplab``) and where pretrained weights come from (``weights``). Families register in
``ENCODERS`` / ``BACKBONES``; build one with :func:`~pbip_core.nets.encoders.get_encoder` /
:func:`~pbip_core.nets.backbones.get_backbone`."""
