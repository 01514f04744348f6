"""Judge the result: sampling, diversity (distinct-n, self-BLEU, entropy), judges and win
rates, the comparison report, the run plots and the in-training diversity probes."""
