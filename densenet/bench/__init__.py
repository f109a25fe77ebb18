"""Benchmarks: this project against torchvision and timm, side by side in one run.

    python -m densenet.bench step ...       # model training step: images/s and peak memory
    python -m densenet.bench loader ...     # our train loader vs ImageFolder + torchvision's preset
    python -m densenet.bench e2e ...        # train_dist.py vs a reference-style training loop
    python -m densenet.bench gpu ...        # the GPU check (one H200): CUDA-only checks, trainer, models
    python -m densenet.bench pipeline ...   # one loader worker: our decode + augmentation vs torchvision's
    python -m densenet.bench decoders ...   # torchcodec vs torchvision vs PIL JPEG decoding
    python -m densenet.bench index ...      # the data index at ImageNet's size vs ImageFolder
    python -m densenet.bench plan ...       # a recipe's schedule on N GPUs, its images, pixels and GPU-hours
    python -m densenet.bench recipes ...    # --recipe fast and LARS at 8x the batch against the paper's recipe
    python -m densenet.bench --help     # every benchmark and its options

Each benchmark prints a table with ratios to a reference row and the spread over repeats, and can
write the rows as JSON (`--json FILE`) so results can be compared across commits.
Benchmarks are not part of the test run; docs/benchmarks.md holds the current figures.
"""
