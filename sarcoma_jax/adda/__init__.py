"""ADDA (thesis §10.1, §14.3, SPEC §4): adversarial discriminative domain adaptation.

task.py        what a problem plugs in (Task, DomainData); segmentation.py the sarcoma one
game.py        the pure game: state, steps, cycles, evaluation
criteria/      the stopping criteria, one file each, and their registry
programs.py    the game's functions jit-compiled over the device mesh (and over seeds)
train.py       the loop: python main.py --config=configs/adda_ct_pt.py
results.py     scoring each criterion's pick at the end: results.json, the summary line
"""
