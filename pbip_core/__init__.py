"""pbip_core: the library behind the PBIP reproducibility book (Tang et al., CVPR 2025).

==================  ==========================================================================================
package             what lives there
==================  ==========================================================================================
``method``          the paper's equations: bank (eq. 1), model (eq. 2-5), losses (eq. 6-13), pseudo masks, zero-shot
``nets``            encoders phi_e, ClassNet backbones, DeepLab-v2, where pretrained weights come from
``data``            dataset folders, augmentation, the checker, the manifest, the built-in datasets
``engine``          running the method on files: bank building, the training step and loops, checkpoints, metrics
``experiments``     grids of runs, the resumable runner, statistics and the paper's numbers
``book``            what the chapters use: set-up, runs, tables, figures, widgets, building the book
``cli``             the ``pbip`` command
``config``          one configuration tree with profiles (smoke, demo, paper) and method presets
==================  ==========================================================================================
"""

__version__ = "0.2.0"
