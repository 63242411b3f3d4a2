"""Tuning decoding to the machine it runs on.

    budget      the dynamic tree's node budget that maximises expected speed here (`--budget auto`
                of `specllava generate` and `specllava bench`): the target's verification cost
                curve and the draft's acceptance profile, both cached under
                ~/.cache/specllava/calibration
"""
