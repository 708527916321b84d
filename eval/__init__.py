"""Evaluation of family checkpoints: lm-eval tasks (`mlra eval tasks`) and the authors' perplexity protocol
(`mlra eval ppl`). Installed as `modeling_mlra.eval`."""
