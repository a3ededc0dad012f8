"""Experiments: grids of runs (:mod:`.grid`), the resumable runner (:mod:`.runner`) and statistics / tables beside
the paper's numbers (:mod:`.report`)."""
