"""The SparsePO controlled-sentiment study (issue 8): reward vs KL of preference-optimisation
methods on the synthetic review language, and where token masks put their weight.

Run `python -m experiments.sentiment_control.study [--quick] [--out DIR] [--seed N]`; see
`study.py`.
"""
