"""The Turbo lab: a distilled tiny Z-Image, made on the CPU, to measure what a LoRA does to few-step quality.

    concepts.py    the synthetic image set: captions whose images are a few exact modes
    metric.py      blur, precision, coverage (in the modes' plane) and off of sampled latents
    measure.py     sampling through sampling.generate_latents, scored with metric.py
    build.py       VAE fit, teacher (flow matching), Turbo student (reflow), de-distill adapter
    ideal.py       the concepts' exact flow-matching field: how blurry a perfect teacher is per step count
    experiment.py  user LoRAs trained with the real `zturbo train`, measured at 1-30 steps
    report.py      the TURBO.md tables (mean and min-max over seeds) and curves

See TURBO.md for what it shows and the commands that reproduce it.
"""
