"""The lab: the survey's empirical claims reproduced at small scale, one command each.

    scaling.py   `emergence lab scaling`: L(N), L(D) and an isoFLOP sweep against a known floor
    fit.py       the power-law and isoFLOP fits they use
"""
