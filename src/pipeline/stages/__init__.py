"""The five stages of a run, one module each: baseline, prune, speedup, finetune, measure."""
