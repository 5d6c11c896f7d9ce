"""Side-by-side benchmarks of featstore / heads against what a user has without them.

Run ``python benchmarks/run.py [--quick] [--only NAME] [--json FILE] [--gpu]``; see README.md.
"""
