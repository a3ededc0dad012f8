"""The method of the paper, equation by equation (torch only: no files, no command line).

=============  ===========  ======================================================================================
module         paper        holds
=============  ===========  ======================================================================================
``bank``       sec. 3.2     eq. 1: single-class selection, white filter, spherical K-means, top-N_K sub-banks,
                            prototypes P (N, K, d)
``model``      sec. 3.3-3.4 eq. 2 SIM and ClassNet; eq. 3-5 fused map, adaptive threshold, FG/BG separation,
                            ImgMatchNet
``losses``     sec. 3.5     eq. 6-13: L_CLS, L_FGS, L_BGS, L_total
``pseudo``     sec. 3.1     CAMs -> pseudo masks (fusion, restricted argmax, background rule)
``zeroshot``   sec. 4.3     Table 6: classification with image prompts (prototypes) and text prompts
=============  ===========  ======================================================================================
"""
