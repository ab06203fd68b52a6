"""Evaluation of trained policies: sampled estimates (`sampled.py`: reward, KL to the reference, win
rate; `Evaluator`, `make_evaluator`, `final_report`), the policies and prompts they sample from
(`policies.py`), the exact optimum and frontier of the synthetic world (`exact.py`), its completion
format (`format.py`: the kinds of malformed samples, the format-constrained projection), and the
reward-KL plot (`plots.py`)."""
