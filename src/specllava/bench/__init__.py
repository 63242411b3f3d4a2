"""Benchmarking: `specllava bench`.

    prompts     (image, prompt) pairs: the shipped evaluation sets or a LLaVA conversation JSON
    methods     one timed generation per method: hf, hf-assisted (transformers' generate) and
                ours (ar, chain, static, dynamic), all measured the same way
    harness     the interleaved, warmed-up measurement loop and the exact-match accounting
    report      medians, speedups, the JSON / markdown / PNG outputs (and the plot of a
                `--budget auto` calibration, which lives in specllava.tuning)
    cli         the `specllava bench` subcommand
"""
